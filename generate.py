"""Sample text from a trained model.

    python generate.py runs/tiny_pkm --prompt "The government said" [--max-new-tokens 100] [--temperature 0.8]
        [--top-k 40] [--top-p 0.95] [--seed 0] [--num-samples N] [--no-cache] [--precision fp32|bf16] [--threads N]
    echo "Shares in the company" | python generate.py runs/tiny_pkm/checkpoints/step_0000300.pt
    python generate.py runs/tiny_pkm --prompt ""          (an empty prompt: a document from its start)

The prompt goes through the run's own Moses tokenizer and BPE (the tokenizer of the data directory saved in the
checkpoint, or --data-dir) and follows an end-of-document token, as a document's start did in training. Each
sample is the prompt and its continuation as text, ending at the end of a document or after --max-new-tokens;
speed goes to stderr. Sample i uses seed --seed + i, so the same seed gives the same text. On the CPU the
one-token steps use the thread count measured fastest on the first steps (pkmlm/eval/threads.py), so the
speed needs no OMP_NUM_THREADS; --threads N fixes it.
Exit status: 0 done, 2 bad input (one line on stderr).
"""

import argparse
import sys
import time

import torch

from pkmlm import cli
from pkmlm.distributed import detect_env, resolve_device
from pkmlm.eval.evaluation import load_trained
from pkmlm.eval.sampling import SamplingError, check_options, generate
from pkmlm.eval.threads import ThreadTuner
from pkmlm.memory.kernels import available as load_kernels, enabled as kernels_enabled, retain_freed_memory
from pkmlm.memory.triton_kernels import mode as triton_mode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--prompt", help="text to continue (default: read from stdin); \"\" for none")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to add at most (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: always the most likely token")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="sample among the most likely tokens holding this probability (1: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed + i")
    parser.add_argument("--num-samples", type=int, default=1, help="samples, computed together (default 1)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole context every token instead of using the KV cache (same text)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of the one-token steps (default 0: the fastest, measured on the first steps)")
    parser.add_argument("--data-dir", help="prepared data directory with the run's tokenizer "
                                           "(default: the data.dir saved in the checkpoint)")
    args = parser.parse_args(argv)

    return cli.run(lambda: _run(args))


def _run(args) -> int:
    kernels_enabled()  # a bad PKMLM_CPU_KERNELS (or PKMLM_TRITON) is reported before any work
    triton_mode()
    check_options(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p)
    if args.num_samples < 1:
        raise SamplingError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.threads < 0:
        raise SamplingError(f"--threads must be >= 0 (0: measure the fastest), got {args.threads}")
    if args.prompt is not None:
        prompt_text = cli.check_text(args.prompt, "--prompt")
    elif sys.stdin.isatty():
        raise SamplingError("no prompt: pass --prompt TEXT (\"\" for none) or pipe the prompt into stdin")
    elif hasattr(sys.stdin, "buffer"):  # bytes, so that invalid UTF-8 is our one-line error, not the tokenizer's
        prompt_text = cli.utf8_text(sys.stdin.buffer.read(), "the prompt on stdin")
    else:  # a text stream (a test's StringIO)
        prompt_text = cli.check_text(sys.stdin.read(), "the prompt on stdin")
    device = resolve_device(args.device, detect_env())
    run = load_trained(args.path, data_dir=args.data_dir, device=device)
    prompt = [run.codec.eos_id] + run.codec.encode(prompt_text)
    seeds = [args.seed + i for i in range(args.num_samples)]
    load_kernels()  # the compiled CPU kernels load (or build) before the clock starts
    import torch._dynamo  # noqa: F401  (the memory's custom ops import it on first call: 0.7 s, not sampling)
    tuner = ThreadTuner(args.threads)
    start = time.perf_counter()
    samples = generate(run.model, prompt, max_new_tokens=args.max_new_tokens, window=run.config.data.bptt,
                       seeds=seeds, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       use_cache=not args.no_cache, stop_id=run.codec.eos_id, precision=args.precision,
                       threads=tuner)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for seed, new in zip(seeds, samples):
        if len(samples) > 1:
            print(f"==== sample {seed - args.seed + 1}/{len(samples)} (seed {seed})")
        print(run.codec.decode(prompt + new))
    tokens = sum(map(len, samples))
    print(f"{run.checkpoint} (step {run.step}): {tokens} new tokens in {seconds:.2f} s, "
          f"{tokens / seconds if seconds > 0 else float('inf'):.1f} tokens/s ({len(prompt)} prompt tokens, "
          f"{'no ' if args.no_cache else ''}KV cache, {device.type} {args.precision}"
          f"{_threads_note(tuner) if device.type == 'cpu' and not args.no_cache else ''})", file=sys.stderr)
    return 0


def _threads_note(tuner: ThreadTuner) -> str:
    if tuner.chosen is None:
        return ", too few steps to measure threads"
    return f", {tuner.chosen} thread{'s' if tuner.chosen > 1 else ''} per step" + (
        "" if len(tuner.candidates) == 1 or not any(tuner.times.values()) else " (measured)")


if __name__ == "__main__":
    retain_freed_memory()  # CPU speed: see pkmlm.memory.kernels
    sys.exit(main())
