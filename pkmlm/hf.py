"""`python -m pkmlm.hf`: pretrained transformers models in, pkmlm models out (pkmlm.models.hf).

    python -m pkmlm.hf import models/SmolLM2-135M --out runs/smollm2         # a transformers directory
    python -m pkmlm.hf import SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2   # or a .gguf (dequantised)
    python -m pkmlm.hf export runs/smollm2_pkm --out exported/smollm2_pkm      # run directory or checkpoint

import writes RUN_DIR/checkpoints/step_0000000.pt, RUN_DIR/config.yaml and RUN_DIR/tokenizer, and prints what it
mapped; generate.py, evaluate.py (with --data-dir of data prepared with --hf-tokenizer) and pkmlm.inspect read it,
and train.py --init-from starts from it. export writes a directory for AutoModelForCausalLM.from_pretrained:
a dense gpt2- or llama-shaped model as that family, any other (memories included) with its own modeling code
(trust_remote_code=True). Exit status: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pkmlm import checkpoint as ckpt
from pkmlm.cli import run
from pkmlm.config import Config
from pkmlm.data import DataError
from pkmlm.eval.evaluation import find_checkpoint, load_model
from pkmlm.eval.textcodec import load_codec
from pkmlm.models.hf import HFError, export_pretrained, import_pretrained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pkmlm.hf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="a transformers model directory or .gguf file -> a pkmlm run")
    imp.add_argument("source", metavar="SRC", help="transformers model directory or .gguf file")
    imp.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to write")
    imp.add_argument("--eos-token", help="the token that ends a document (default: <|endoftext|> or "
                                         "<|end_of_text|> when the vocabulary has one, else the model's eos)")
    imp.add_argument("--bptt", type=int, default=1024, help="data.bptt of the written config (capped at the "
                                                            "model's context)")
    imp.add_argument("--batch-size", type=int, default=8, help="data.batch_size of the written config")
    exp = commands.add_parser("export", help="a pkmlm run or checkpoint -> a transformers model directory")
    exp.add_argument("path", metavar="RUN_OR_CHECKPOINT")
    exp.add_argument("--out", required=True, metavar="DIR", help="the directory to write (replaced)")
    exp.add_argument("--data-dir", help="prepared data directory with the run's tokenizer (default: the data.dir "
                                        "saved in the checkpoint)")
    exp.add_argument("--remote-code", action="store_true",
                     help="always export as model_type pkmlm with its modeling code, also a gpt2/llama-shaped model")
    args = parser.parse_args(argv)
    return run(lambda: _command(args))


def _command(args) -> None:
    if args.command == "import":
        if args.bptt < 1 or args.batch_size < 1:
            raise HFError(f"--bptt ({args.bptt}) and --batch-size ({args.batch_size}) must be positive")
        report = import_pretrained(args.source, args.out, eos_token=args.eos_token, bptt=args.bptt,
                                   batch_size=args.batch_size)
    else:
        path = find_checkpoint(args.path)
        state = ckpt.load_checkpoint(path)
        config = Config.from_dict(state["config"], source=f"{path} (saved config)")
        root = Path(args.data_dir or config.data.dir)
        try:
            codec = load_codec(root, vocab_hash=state["vocab_hash"])
        except DataError as e:
            raise DataError(f"{e} (export writes the run's tokenizer: pass --data-dir with the data the run "
                            "was trained on)") from None
        model = load_model(state, path, torch.device("cpu"))
        report = export_pretrained(model, args.out, tokenizer_dir=codec.tokenizer.directory,
                                   native=not args.remote_code)
    print(report.summary())


if __name__ == "__main__":
    sys.exit(main())
