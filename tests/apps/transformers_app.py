"""Someone else's app: a Hugging Face transformers model, built from a config (random
weights, nothing downloaded), run in a loop on "cuda" the way its documentation shows.
rrto's tests run it unmodified; it saves every output to compare runs.

    python transformers_app.py --model vit --frames 20 --save out.npz
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import transformers as tf


def build(name: str):
    """(model, inputs of frame i) for a small model of each family."""
    def images(i):
        return {"pixel_values": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(i))}

    def tokens(i):
        return {"input_ids": torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(i))}

    if name == "vit":  # image classification: what a robot's camera loop might run
        cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=64, patch_size=8, num_labels=10)
        return tf.ViTForImageClassification(cfg), images
    if name == "swin":  # shifted windows: roll, window partitions, a pooled head
        cfg = tf.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                            window_size=4, num_labels=10)
        return tf.SwinForImageClassification(cfg), images
    if name == "detr":  # object detection: a ResNet backbone, an encoder-decoder, 10 queries
        backbone = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                   out_features=["stage4"])
        cfg = tf.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                            d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10)
        return tf.DetrForObjectDetection(cfg), images
    if name == "bert":  # a text command classifier, with an attention mask
        cfg = tf.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, num_labels=3)

        def masked(i):
            ids = tokens(i)["input_ids"]
            mask = torch.ones_like(ids)
            mask[0, 12 - i % 4:] = 0  # padding that changes from frame to frame
            return {"input_ids": ids, "attention_mask": mask}
        return tf.BertForSequenceClassification(cfg), masked
    if name == "gpt2":  # a language model: a forward each frame, greedy generation every fifth
        cfg = tf.GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg), tokens
    raise SystemExit(f"unknown model {name!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit", choices=["vit", "swin", "detr", "bert", "gpt2"])
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--save", help="write every output to this .npz")
    a = p.parse_args()
    torch.manual_seed(0)
    model, inputs = build(a.model)
    model = model.eval().cuda()
    outs = {}
    with torch.no_grad():
        for i in range(a.frames):
            x = {k: v.cuda() for k, v in inputs(i).items()}
            if a.model == "gpt2" and i % 5 == 4:
                ids = model.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=0)
                outs[f"generated{i}"] = ids.cpu().numpy()
                continue
            for k, v in model(**x).items():
                if torch.is_tensor(v):
                    outs[f"{k}{i}"] = v.cpu().numpy()
    if a.save:
        np.savez(a.save, **outs)


if __name__ == "__main__":
    main()
