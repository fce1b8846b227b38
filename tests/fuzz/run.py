"""Run one fuzz harness: coverage-guided with atheris (libFuzzer) when it is installed, else a
plain mutational fuzzer over the same harness and corpus.

    python tests/fuzz/run.py HARNESS [--seconds N] [--runs N] [--corpus DIR] [--artifacts DIR] [-- libFuzzer flags]

HARNESS is one of gguf_bytes, gguf_structured, safetensors_config, llama2c, tokenizer_json,
generation_config, sharded_index. New inputs go to
--corpus (default: a temporary directory), the seeds of tests/fuzz/corpus/HARNESS are read too.
A failing input is written to --artifacts (default: the current directory) and the exit status is
not 0; keep it under tests/fuzz/regressions/HARNESS/ once fixed. The output ends with libFuzzer's
final statistics (executions, coverage in `cov:`), or with the plain fuzzer's summary line
`fuzz HARNESS: runs=... findings=...`.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MAX_LEN = 65536


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("harness")
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--runs", type=int, default=-1, help="stop after this many inputs (-1: no limit)")
    p.add_argument("--corpus", type=Path, default=None)
    p.add_argument("--artifacts", type=Path, default=Path.cwd())
    p.add_argument("--engine", choices=("auto", "atheris", "simple"), default="auto")
    p.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags (after --)")
    args = p.parse_args(argv)
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix=f"fuzz-{args.harness}-"))
    corpus.mkdir(parents=True, exist_ok=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    seeds = HERE / "corpus" / args.harness
    try:
        import atheris
    except ImportError:
        atheris = None
    if args.engine == "atheris" or (args.engine == "auto" and atheris is not None):
        return _atheris(atheris, args, corpus, seeds)
    return _simple(args, corpus, seeds)


def _atheris(atheris, args, corpus: Path, seeds: Path) -> int:
    # Every module a load can reach, imported first; then their code is instrumented in place
    # (the editable install's import hook hides them from atheris.instrument_imports).
    import tokentrail.loading.gguf  # noqa: F401
    import tokentrail.loading.hf  # noqa: F401
    import tokentrail.loading.llama2c  # noqa: F401
    import tokentrail.loading.quant  # noqa: F401
    import tokentrail.model  # noqa: F401
    import tokentrail.rope  # noqa: F401
    import tokentrail.chat  # noqa: F401
    import tokentrail.generation  # noqa: F401
    import tokentrail.generation_config  # noqa: F401
    import tokentrail.tokenizer  # noqa: F401
    _instrument_tokentrail(atheris)
    import harnesses

    target = harnesses.HARNESSES[args.harness]
    flags = [f"-max_total_time={args.seconds}", f"-runs={args.runs}", "-timeout=20", "-rss_limit_mb=4096",
             f"-max_len={MAX_LEN}", f"-artifact_prefix={args.artifacts}/", "-print_final_stats=1",
             f"-dict={HERE / 'tokens.dict'}"]
    atheris.Setup([sys.argv[0], *flags, *args.libfuzzer, str(corpus), str(seeds)], target)
    atheris.Fuzz()
    return 0


def _instrument_tokentrail(atheris) -> None:
    """Add coverage callbacks to every function and method of tokentrail's loaded modules."""
    import inspect

    seen = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("tokentrail") or module is None:
            continue
        for obj in vars(module).values():
            members = [obj] + ([m for c in (obj,) for m in vars(c).values()] if inspect.isclass(obj) else [])
            for f in members:
                f = getattr(f, "__func__", f)
                if isinstance(f, property):
                    f = f.fget
                if (inspect.isfunction(f) and f.__module__ and f.__module__.startswith("tokentrail")
                        and id(f) not in seen):
                    seen.add(id(f))
                    atheris.instrument_func(f)


def _simple(args, corpus: Path, seeds: Path) -> int:
    """Byte mutations (flip, set interesting values, insert, erase, splice) of corpus entries; no
    coverage feedback. For machines where atheris does not install."""
    import harnesses

    target = harnesses.HARNESSES[args.harness]
    pool = [f.read_bytes() for d in (seeds, corpus) for f in sorted(d.glob("*")) if f.is_file()] or [b""]
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "0")) or None)
    interesting = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80",
                   b"\xff\xff\xff\xff\xff\xff\xff\xff", b"NaN", b"1e400", b"-1", b"[", b"{", b'"', b"0"]
    deadline = time.monotonic() + args.seconds
    runs = 0
    while time.monotonic() < deadline and runs != args.runs:
        data = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 8)):
            op = rng.randrange(5)
            at = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
            elif op == 1:
                v = rng.choice(interesting)
                data[at:at + len(v)] = v
            elif op == 2:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif op == 3:
                del data[at:at + rng.randint(1, 16)]
            else:
                other = rng.choice(pool)
                start = rng.randrange(len(other) + 1)
                data[at:] = other[start:start + rng.randint(0, 4096)] + data[at:]
        data = bytes(data[:MAX_LEN])
        runs += 1
        try:
            target(data)
        except Exception:
            out = args.artifacts / f"crash-{args.harness}-{runs}"
            out.write_bytes(data)
            traceback.print_exc()
            print(f"fuzz {args.harness}: runs={runs} cov=n/a corpus={len(pool)} findings=1 ({out})")
            return 1
    print(f"fuzz {args.harness}: runs={runs} cov=n/a corpus={len(pool)} findings=0")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
