"""The `tokentrail` command: generate, follow a token's journey, write a report, and more."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _model(args):
    import tokentrail

    return tokentrail.load(args.model, dtype=getattr(args, "dtype", None), threads=args.threads,
                           kv_dtype=getattr(args, "kv_dtype", "f32"))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="Hugging Face directory, .gguf file or llama2.c .bin (default: the bundled demo model)")
    p.add_argument("--threads", type=int, default=None, help="threads for the core (default: all cores)")
    p.add_argument("--dtype", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="convert the weight matrices to this type when loading")
    p.add_argument("--kv-dtype", default="f32", choices=["f32", "f16"],
                   help="element type of the KV cache (f16: half the memory, keys and values rounded)")


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--temperature", "-t", type=float, default=temperature,
                   help=f"0 = greedy (default {temperature:g})")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--typical-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--mirostat", type=int, default=0, choices=[0, 1, 2])
    p.add_argument("--order", default="hf", help="processor chain order: hf or llama.cpp")
    p.add_argument("--seed", type=int, default=None)


def _sampling_options(args) -> dict:
    opts = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty, "order": args.order}
    if args.typical_p is not None:
        opts["typical_p"] = args.typical_p
    if args.mirostat:
        opts["mirostat"] = args.mirostat
    return opts


def cmd_generate(args) -> int:
    from rich.console import Console

    model = _model(args)
    if model.tokenizer is None:
        print("error: this checkpoint has no tokenizer, so it cannot generate from text", file=sys.stderr)
        return 2
    steps = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop or (),
                           stream=True, logprobs=args.show_probs, top_n=args.top_n if args.show_probs else 0,
                           **_sampling_options(args))
    out = sys.stdout
    if args.show_probs:
        console = Console(highlight=False)
        console.print(f"[bold]{args.prompt}[/bold]")
        for s in steps:
            model_top = "  ".join(f"{a.text!r} {a.prob:.2f}" for a in s.top_model)
            sampled_top = "  ".join(f"{a.text!r} {a.prob:.2f}" for a in s.top_sampled)
            console.print(f"{s.index:>3} [bold green]{model.tokenizer.display(s.token)!r}[/bold green] "
                          f"p={2.718281828459045 ** s.logprob:.3f} rank {s.rank}")
            console.print(f"    model:   {model_top}", style="dim")
            console.print(f"    sampled: {sampled_top}", style="dim")
        return 0
    out.write(args.prompt)
    out.flush()
    for s in steps:
        out.write(s.text)
        out.flush()
    out.write("\n")
    return 0


CHAT_HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system message), "
             "/journey (follow the last reply's last token through the model), /quit; Ctrl-C or end of input quits")


def cmd_chat(args) -> int:
    """An interactive conversation on stdin/stdout, streaming each reply."""
    from .chat import ChatTemplateError, prepare, template_of
    from .report.terminal import print_journey

    model = _model(args)
    template = None
    if args.chat_template is not None:
        with open(args.chat_template, encoding="utf-8") as fh:
            template = fh.read()
    template = template_of(model, template)  # fails now, not at the first message, without a template
    options = _sampling_options(args)
    system = args.system
    history: list[dict] = []
    last: tuple[list[int], list[int]] | None = None  # (prompt ids, reply ids) of the last reply
    out = sys.stdout
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            out.write("> ")
            out.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        if not line:  # end of input
            out.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                history, last = [], None
                print("(conversation cleared)")
            elif command == "/system":
                system = rest.strip() or None
                print(f"(system message {'set' if system else 'removed'})")
            elif command == "/journey":
                if last is None:
                    print("(no reply yet)")
                    continue
                prompt_ids, reply_ids = last
                context, token = prompt_ids + reply_ids[:-1], reply_ids[-1]
                j = model.journey(context, temperature=args.temperature if args.temperature > 0 else 1.0,
                                  top=args.top, chosen=token)
                print_journey(j, width=args.width)
            else:
                print(f"(unknown command {command}; {CHAT_HELP})")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + \
            [{"role": "user", "content": text}]
        try:
            _, ids, end_ids = prepare(model, messages, chat_template=template)
        except ChatTemplateError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        reply, tokens = "", []
        try:
            for step in model.generate(ids, max_new_tokens=args.max_new_tokens, seed=args.seed, eos_ids=end_ids,
                                       stream=True, **options):
                out.write(step.text)
                out.flush()
                reply += step.text
                if step.finish_reason != "eos":
                    tokens.append(step.token)
        except KeyboardInterrupt:  # stop this reply; keep what was said
            out.write(" [interrupted]")
        out.write("\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        if tokens:
            last = (ids, tokens)


def cmd_serve(args) -> int:
    """The OpenAI-compatible HTTP server."""
    from pathlib import Path

    try:
        from .server import serve
    except ImportError as e:
        print(f"error: the server needs FastAPI and uvicorn ({e}); pip install 'tokentrail[serve]'", file=sys.stderr)
        return 2
    for name in ("parallel", "max_queue", "prefill_chunk", "port"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            print(f"error: --{name.replace('_', '-')} must be {'>= 0' if name == 'max_queue' else '>= 1'}",
                  file=sys.stderr)
            return 2
    template = None
    if args.chat_template is not None:
        template = Path(args.chat_template).read_text(encoding="utf-8")
    if args.as_program and "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP threads that spin between steps starve the server's HTTP thread (on two
        # cores, one client got 8 instead of 69 tokens/s). The policy is read when the
        # core loads, so the command starts again with sleeping threads.
        os.environ["OMP_WAIT_POLICY"] = "passive"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "tokentrail.cli", *sys.argv[1:]])
    model = _model(args)
    name = args.model_name or (Path(args.model).name if args.model else "tokentrail-demo")
    serve(model, host=args.host, port=args.port, model_name=name, parallel=args.parallel, max_queue=args.max_queue,
          prefill_chunk=args.prefill_chunk, timeout=args.timeout if args.timeout > 0 else None,
          chat_template=template)
    return 0


def cmd_journey(args) -> int:
    from .report.terminal import print_journey

    model = _model(args)
    j = model.journey(args.prompt, temperature=args.temperature, seed=args.seed, top=args.top)
    print_journey(j, width=args.width)
    return 0


def cmd_report(args) -> int:
    from .report.html import write_report

    model = _model(args)
    j = model.journey(args.prompt, temperature=args.temperature, seed=args.seed, top=args.top)
    path = write_report(j, args.output)
    print(f"wrote {path}")
    return 0


def cmd_thermo(args) -> int:
    from .report.terminal import print_temperature_table

    model = _model(args)
    logits = model.forward(model.encode(args.prompt), all_positions=False)
    print_temperature_table(model, logits, [float(t) for t in args.temperatures.split(",")], top=args.top)
    return 0


def cmd_score(args) -> int:
    model = _model(args)
    result = model.score(args.text, top_n=args.top_n)
    print(json.dumps(result.to_dict() if hasattr(result, "to_dict") else result.__dict__, default=str, indent=1))
    return 0


def cmd_convert(args) -> int:
    from .loading import read_checkpoint
    from .loading.gguf_writer import write_gguf

    path = write_gguf(read_checkpoint(args.source), args.output, dtype=args.type)
    print(f"wrote {path}")
    return 0


def cmd_info(args) -> int:
    from . import _core

    model = _model(args)
    print(model)
    print(json.dumps(model.config.to_dict(), indent=1))
    types = sorted({w.dtype for w in model.weights.values()})
    print(f"parameters: {model.n_params:,}  weight types: {', '.join(types)}  kernels: {_core.isa()} "
          f"(available: {', '.join(_core.available_isas())})  threads: {_core.get_threads()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tokentrail", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt, streaming tokens as they are produced")
    g.add_argument("prompt")
    _add_model_args(g)
    g.add_argument("--max-new-tokens", "-n", type=int, default=48)
    _add_sampling_args(g, temperature=0.0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--show-probs", action="store_true", help="print each step's alternatives before and after the chain")
    g.add_argument("--top-n", type=int, default=5)
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="talk to an instruct model in the terminal, through its chat template")
    _add_model_args(ch)
    ch.add_argument("--system", default=None, help="system message to start with")
    ch.add_argument("--chat-template", default=None, help="a Jinja chat template file to use instead of the model's")
    ch.add_argument("--max-new-tokens", "-n", type=int, default=512)
    _add_sampling_args(ch, temperature=0.7)
    ch.add_argument("--top", type=int, default=5, help="candidates shown by /journey")
    ch.add_argument("--width", type=int, default=None, help="terminal width for /journey (default: detected)")
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--parallel", type=int, default=4, help="sequences advanced together at each step")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="sequences that may wait for a slot; beyond it requests get 429")
    sv.add_argument("--prefill-chunk", type=int, default=256,
                    help="prompt tokens a sequence prefills per step, so long prompts do not stall others")
    sv.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (0: no limit)")
    sv.add_argument("--model-name", default=None, help="the model id /v1/models reports (default: the path's name)")
    sv.add_argument("--chat-template", default=None, help="a Jinja chat template file to use instead of the model's")
    sv.set_defaults(func=cmd_serve)

    for name, func, helptext in (("journey", cmd_journey, "follow the last token of a prompt through the model"),
                                 ("report", cmd_report, "write the journey as one self-contained HTML page")):
        j = sub.add_parser(name, help=helptext)
        j.add_argument("prompt")
        _add_model_args(j)
        j.add_argument("--temperature", "-t", type=float, default=1.0)
        j.add_argument("--seed", type=int, default=None, help="sample the chosen token with this seed (default: greedy)")
        j.add_argument("--top", type=int, default=5)
        if name == "journey":
            j.add_argument("--width", type=int, default=None, help="terminal width (default: detected)")
        else:
            j.add_argument("--output", "-o", default="journey.html")
        j.set_defaults(func=func)

    t = sub.add_parser("thermo", help="the next token's top candidates at several temperatures")
    t.add_argument("prompt")
    _add_model_args(t)
    t.add_argument("--temperatures", default="0,0.25,0.5,1,2,5")
    t.add_argument("--top", type=int, default=8)
    t.set_defaults(func=cmd_thermo)

    s = sub.add_parser("score", help="log-probability of every token of a text, and its perplexity")
    s.add_argument("text")
    _add_model_args(s)
    s.add_argument("--top-n", type=int, default=3)
    s.set_defaults(func=cmd_score)

    c = sub.add_parser("convert", help="write any readable checkpoint as GGUF")
    c.add_argument("source")
    c.add_argument("output")
    c.add_argument("--type", "--dtype", dest="type", default="f32", choices=["f32", "f16", "q8_0", "q4_0"])
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="a checkpoint's configuration and the kernels in use")
    _add_model_args(i)
    i.set_defaults(func=cmd_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.as_program = argv is None  # run as the command (not called from Python with arguments)
    from .errors import TokentrailError

    try:
        return args.func(args)
    except (TokentrailError, ValueError, KeyError, IndexError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
