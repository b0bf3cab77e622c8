"""Client-side execution of recorded and streamed operators."""
