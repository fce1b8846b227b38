"""Turn bench/compare.py result files into docs/benchmarks.md and its PNG plots.

    python bench/plot_compare.py bench/results/compare.json [bench/results/compare-tinyllama.json ...]

The first file gives the plots and the main table; each further file (a
separate run, e.g. a large model) adds a section with its own roofs.
bench/results/gemm.json (from bench/gemm_vs_numpy.py), when present, adds
the GEMM-against-numpy table.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
ENGINES = ("tokentrail", "llama.cpp", "transformers")
COLORS = {"tokentrail": "#2a7", "llama.cpp": "#47a", "transformers": "#c84"}


def bar_chart(rows, metric: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["shape"], r["type"]) for r in rows}, key=lambda g: (g[0], g[1]))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups)), 3.6))
    width = 0.27
    for i, e in enumerate(ENGINES):
        vals = [next((r[metric] for r in rows if (r["shape"], r["type"]) == g and r["engine"] == e), 0) for g in groups]
        ax.bar([x + (i - 1) * width for x in range(len(groups))], vals, width, label=e, color=COLORS[e])
    ax.set_xticks(range(len(groups)), [f"{s}\n{t}" for s, t in groups], fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows) -> list[str]:
    def get(shape, t, e, k):
        return next((r[k] for r in rows if r["shape"] == shape and r["type"] == t and r["engine"] == e), None)

    lines = ["| model | type | engine | prefill 16 / 128 / 512 tok/s | decode @128 / @1024 tok/s | "
             "decode @128 / @1024 vs llama.cpp | % bandwidth roof | prefill 512 vs llama.cpp | load s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["shape"], r["type"], ENGINES.index(r["engine"]))):
        ref_d = get(r["shape"], r["type"], "llama.cpp", "decode_128")
        ref_l = get(r["shape"], r["type"], "llama.cpp", "decode_1024")
        ref_p = get(r["shape"], r["type"], "llama.cpp", "prefill_512")
        lines.append(
            f"| {r['shape']} | {r['type']} | {r['engine']} | {r['prefill_16']:.0f} / {r['prefill_128']:.0f} / "
            f"{r['prefill_512']:.0f} | {r['decode_128']:.1f} / {r['decode_1024']:.1f} | "
            f"{(r['decode_128'] / ref_d) if ref_d else float('nan'):.2f}x / "
            f"{(r['decode_1024'] / ref_l) if ref_l else float('nan'):.2f}x | {r['decode_128_roof']:.0%} | "
            f"{(r['prefill_512'] / ref_p) if ref_p else float('nan'):.2f}x | {r['load_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} |")
    return lines


def describe(data) -> str:
    roof = data["roof"]
    return (f"Measured {data['date']} on {data['machine'].get('cpu', '?')} ({data['machine'].get('cpus')} cores, "
            f"{data['machine'].get('mem_gb')} GiB), {roof['threads']} threads, kernels `{roof['isa']}`. "
            f"Roofs measured in the same run: read bandwidth {roof['bandwidth_gbs']:.1f} GB/s"
            + (f" (best of {len(roof['bandwidth_probes_gbs'])} probes, which ranged "
               f"{min(roof['bandwidth_probes_gbs']):.0f}-{max(roof['bandwidth_probes_gbs']):.0f})"
               if roof.get("bandwidth_probes_gbs") else "") + ", "
            f"FMA peak {roof['peak_gflops']:.0f} GFLOP/s. " + kv_note(data))


def kv_note(data) -> str:
    kv = data.get("kv_dtype")
    if kv is None:  # runs before --kv-dtype existed: each engine kept its default
        return "KV cache: tokentrail float32, llama.cpp f16 (each engine's default)."
    return f"KV cache: {kv} for tokentrail and llama.cpp alike" + (", float32 for transformers." if kv != "f32" else ".")


def gemm_section(data) -> list[str]:
    rows = data["rows"]
    ratios = [r["tokentrail_gflops"] / r["numpy_gflops"] for r in rows]
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    lines = ["", "## Prefill GEMM against numpy's sgemm (OpenBLAS)", "",
             f"Measured {data['date']}, {data['threads']} threads on both sides, kernels `{data['isa']}`; "
             "float32 y = x W^T on the products of each model, tokentrail packing its panels inside the timed "
             f"call. Reproduce: `OPENBLAS_NUM_THREADS=2 python bench/gemm_vs_numpy.py --out bench/results/gemm.json`. "
             f"Geometric mean: {geo:.2f}x numpy.", "",
             "| model | product | rows x cols | tokens | tokentrail GFLOP/s | numpy GFLOP/s | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r, q in zip(rows, ratios):
        lines.append(f"| {r['model']} | {r['product']} | {r['rows']} x {r['cols']} | {r['tokens']} | "
                     f"{r['tokentrail_gflops']:.0f} | {r['numpy_gflops']:.0f} | {q:.2f}x |")
    return lines


def main() -> None:
    files = [Path(f) for f in sys.argv[1:]] or [Path("bench/results/compare.json")]
    data = json.loads(files[0].read_text())
    rows = data["results"]
    DOCS.mkdir(exist_ok=True)
    bar_chart(rows, "decode_128", "decode at context 128", DOCS / "bench-decode.png")
    bar_chart(rows, "prefill_512", "prefill of 512 tokens", DOCS / "bench-prefill.png")

    lines = ["# Benchmarks", "", describe(data), "",
             "Reproduce: `python bench/compare.py --shapes gpt2,smollm --types f32,f16,q8_0,q4_0 "
             "--out bench/results/compare.json && python bench/plot_compare.py bench/results/compare.json`.",
             "Random weights in the shapes of real models; every engine reads the same GGUF file "
             "(transformers its Hugging Face twin, float types only); each engine runs in a fresh "
             "process, engines interleaved; medians.", "",
             "![decode](bench-decode.png)", "", "![prefill](bench-prefill.png)", ""] + table(rows)
    for extra in files[1:]:
        more = json.loads(extra.read_text())
        shapes = ", ".join(sorted({r["shape"] for r in more["results"]}))
        kv = more.get("kv_dtype")
        title = f"{shapes}, KV cache {kv}" if kv and kv != data.get("kv_dtype") else shapes
        lines += ["", f"## {title} (a separate run)", "", describe(more), ""] + table(more["results"])
    gemm = files[0].parent / "gemm.json"
    if gemm.exists():
        lines += gemm_section(json.loads(gemm.read_text()))
    (DOCS / "benchmarks.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
