"""Recording: the op log, its Operator Sequence Search, and the Program it finds."""
from .log import CONSTANT_BYTES, GET, HOLES, MODEL_STATE, OP, PUT, RNG, SEED, SYNC, Event, OpLog, name_key
from .oss import SequenceSearch
from .program import CPU, EXT, IN, PERSIST, Program, Step, erase, pattern_of

__all__ = ["Event", "OpLog", "name_key", "CONSTANT_BYTES", "SequenceSearch", "Program", "Step", "erase", "pattern_of",
           "MODEL_STATE", "OP", "PUT", "GET", "SYNC", "SEED", "RNG", "HOLES", "IN", "PERSIST", "EXT", "CPU"]
