"""The `tokentrail` command: generate, chat, serve, follow a token's journey, write a report, and more.

Each subcommand is one `add_<name>` function (its parser) and one `cmd_<name>`
function (what it does), sharing the option groups below; flags follow
llama.cpp's names where its users already know them (-m, -t threads, -c, -n,
-s, -p, -f, --temp, --top-k, --repeat-penalty, ...).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from . import __version__

GREEDY_HELP = "default: the model's generation_config.json, else greedy"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """A mistake on the command line found after parsing (exit code 2)."""


# ---------------------------------------------------------------- shared option groups

def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _count(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Which checkpoint and how to run it: -m, -t, --dtype, -c, --kv-dtype, --exact, --repack, --progress."""
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=None,
                   help="Hugging Face directory, .gguf file or llama2.c .bin (default: the bundled demo model)")
    g.add_argument("-t", "--threads", type=_positive_int, default=None,
                   help="threads for the core (default: every core)")
    g.add_argument("--dtype", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="convert the weight matrices to this type when loading (default: as stored)")
    g.add_argument("-c", "--ctx-size", dest="ctx_size", type=_positive_int, default=None,
                   help="positions a session holds (default: the model's context, at most 8192)")
    g.add_argument("--kv-dtype", default="f32", choices=["f32", "f16"],
                   help="element type of the KV cache (f16: half the memory, keys and values rounded; "
                        "default: %(default)s)")
    g.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                   help="float32 activations in quantized products; --no-exact rounds them to int8 per block "
                        "as llama.cpp does (faster prefill, logits differ by that rounding; default: exact)")
    g.add_argument("--repack", action=argparse.BooleanOptionalAction, default=None,
                   help="lay block-quantized matrices out once more for the AVX-512 row-lane kernels (faster "
                        "products, as many bytes again as those weights; default: where the CPU has the AVX-512 "
                        "VNNI kernels)")
    add_progress_option(g)


def add_progress_option(g) -> None:
    """--progress/--no-progress (default: a bar when stderr is a terminal)."""
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr for long work (default: when stderr is a terminal)")


def add_prompt_options(p: argparse.ArgumentParser, what: str = "prompt") -> None:
    """The text to work on: positional, -p, or -f FILE; '-' reads standard input."""
    g = p.add_argument_group(what)
    g.add_argument(what, nargs="?", default=None, help=f"the {what} ('-' reads standard input)")
    g.add_argument("-p", "--prompt" if what == "prompt" else f"--{what}", dest=f"{what}_option", default=None,
                   metavar=what.upper(), help=f"the {what}, as an option (as llama.cpp takes it)")
    g.add_argument("-f", "--file", default=None, help=f"read the {what} from this file ('-': standard input)")


def read_prompt(args, what: str = "prompt") -> str:
    """The text given positionally, with -p, or with -f (one of them), '-' meaning stdin."""
    given = [(name, v) for name, v in ((what, getattr(args, what)), (f"-p/--{what}", getattr(args, f"{what}_option")),
                                       ("-f/--file", args.file)) if v is not None]
    if not given:
        raise UsageError(f"no {what}: give it as an argument, with -p, or with -f FILE ('-' for stdin)")
    if len(given) > 1:
        raise UsageError(f"the {what} is given twice ({' and '.join(n for n, _ in given)}); give it once")
    name, value = given[0]
    if value == "-":
        return _without_final_newline(sys.stdin.read())
    if name == "-f/--file":
        path = Path(value)
        if path.is_dir():
            raise UsageError(f"-f/--file: {value} is a directory")
        return _without_final_newline(path.read_text(encoding="utf-8"))
    return value


def _without_final_newline(text: str) -> str:
    """A file's or a pipe's text without the newline that ends its last line (as llama.cpp reads -f)."""
    return text[:-1] if text.endswith("\n") else text


def add_length_options(p: argparse.ArgumentParser) -> None:
    """How long to generate and when to stop: -n, --max-length, --stop, --eos-token-id, --ignore-eos, -s."""
    g = p.add_argument_group("length and end")
    g.add_argument("-n", "--n-predict", "--max-new-tokens", dest="max_new_tokens", type=_count, default=None,
                   help="tokens to generate (default: the model's generation_config.json, else 64)")
    g.add_argument("--max-length", type=_positive_int, default=None,
                   help="total length, prompt included (transformers' max_length), instead of -n")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears, cut before it (repeatable)")
    g.add_argument("--eos-token-id", type=_count, action="append", default=None, metavar="ID",
                   help="end-of-sequence token id (repeatable; default: the model's)")
    g.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens")
    g.add_argument("-s", "--seed", type=_count, default=None,
                   help="seed for reproducible sampling (default: fresh entropy, printed with the timings)")


def _logit_bias(text: str) -> tuple[int, float]:
    """llama.cpp's TOKEN_ID(+|-)BIAS, e.g. 15043+1 or 15043-inf."""
    for i in range(1, len(text)):
        if text[i] in "+-" and text[:i].isdigit():
            try:
                return int(text[:i]), float(text[i:])
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"expected TOKEN_ID+BIAS or TOKEN_ID-BIAS (e.g. 15043+1, 15043-inf), "
                                     f"got {text!r}")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Every stage of the processor chain (tokentrail.sampling), with llama.cpp's names where it has them."""
    g = p.add_argument_group("sampling", "every option defaults to the model's generation_config.json, else "
                                         "to off; decoding is greedy unless --temp > 0 or --do-sample")
    g.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                   help=f"sample (or, --no-do-sample, decode greedily) as transformers' do_sample; {GREEDY_HELP}")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=None,
                   help=f"temperature; 0 = greedy, above 0 samples ({GREEDY_HELP})")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-k-ties", choices=["keep", "cut"], default="keep",
                   help="at the k-th logit keep every tied token (transformers) or exactly k (llama.cpp); "
                        "default: %(default)s")
    g.add_argument("--top-p", type=float, default=None, help="nucleus: keep the most likely tokens up to this "
                                                              "mass (1 = off)")
    g.add_argument("--min-p", type=float, default=None, help="keep tokens with p >= min_p * p_max (0 = off)")
    g.add_argument("--typical", "--typical-p", dest="typical_p", type=float, default=None,
                   help="locally typical sampling mass (1 = off)")
    g.add_argument("--epsilon-cutoff", type=float, default=None, help="remove tokens with p < epsilon (0 = off)")
    g.add_argument("--eta-cutoff", type=float, default=None, help="eta sampling cutoff (0 = off)")
    g.add_argument("--top-nsigma", "--top-n-sigma", dest="top_n_sigma", type=float, default=None,
                   help="keep logits within n standard deviations of the best (default: off)")
    g.add_argument("--dynatemp-range", type=float, default=0.0,
                   help="dynamic temperature: temperature +- range by the entropy (default: %(default)s = off)")
    g.add_argument("--dynatemp-exp", "--dynatemp-exponent", dest="dynatemp_exponent", type=float, default=1.0,
                   help="dynamic temperature exponent (default: %(default)s)")
    g.add_argument("--xtc-probability", type=float, default=0.0,
                   help="XTC: chance of removing the top choices (default: %(default)s = off)")
    g.add_argument("--xtc-threshold", type=float, default=0.1,
                   help="XTC: tokens at least this likely count as top choices (default: %(default)s)")
    g.add_argument("--dry-multiplier", type=float, default=0.0, help="DRY penalty strength (default: %(default)s "
                                                                     "= off)")
    g.add_argument("--dry-base", type=float, default=1.75, help="DRY penalty base (default: %(default)s)")
    g.add_argument("--dry-allowed-length", type=int, default=2,
                   help="DRY: repetitions up to this length go unpenalised (default: %(default)s)")
    g.add_argument("--dry-penalty-last-n", "--dry-window", dest="dry_window", type=_count, default=None,
                   help="DRY: tokens searched for repetitions (default: all)")
    g.add_argument("--dry-sequence-breaker", dest="dry_breakers", action="append", default=None, metavar="TOKEN",
                   help="DRY: a token id, or a text that is one token, that breaks repetitions (repeatable)")
    g.add_argument("--mirostat", type=int, default=0, choices=[0, 1, 2],
                   help="mirostat version (0 = off; default: %(default)s)")
    g.add_argument("--mirostat-ent", "--mirostat-tau", dest="mirostat_tau", type=float, default=5.0,
                   help="mirostat target entropy tau (default: %(default)s)")
    g.add_argument("--mirostat-lr", "--mirostat-eta", dest="mirostat_eta", type=float, default=0.1,
                   help="mirostat learning rate eta (default: %(default)s)")
    g.add_argument("--repeat-penalty", "--repetition-penalty", dest="repetition_penalty", type=float, default=None,
                   help="divide repeated tokens' positive logits by this (1 = off)")
    g.add_argument("--repeat-last-n", type=_count, default=None,
                   help="tokens the repetition, presence and frequency penalties look back over "
                        "(llama.cpp's; sets --repetition-window and --penalty-window)")
    g.add_argument("--repetition-window", type=_count, default=None,
                   help="tokens the repetition penalty looks back over (default: the whole context)")
    g.add_argument("--repetition-negative", choices=["multiply", "divide"], default="multiply",
                   help="negative logits of repeated tokens are multiplied (default) or divided")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted once from every token present (default: %(default)s)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted per occurrence (default: %(default)s)")
    g.add_argument("--penalty-window", type=_count, default=64,
                   help="tokens the presence and frequency penalties look back over (default: %(default)s)")
    g.add_argument("--no-repeat-ngram-size", type=_count, default=None,
                   help="ban tokens that would repeat an n-gram of this size (0 = off)")
    g.add_argument("-l", "--logit-bias", type=_logit_bias, action="append", default=None, metavar="ID+BIAS",
                   help="add a bias to a token's logit, e.g. 15043+1 or 15043-inf (repeatable)")
    g.add_argument("--ban", dest="banned_tokens", type=_count, action="append", default=None, metavar="ID",
                   help="never choose this token id (repeatable)")
    g.add_argument("--min-keep", type=_positive_int, default=1,
                   help="truncation samplers keep at least this many tokens (default: %(default)s)")
    g.add_argument("--order", default="hf",
                   help="processor order: hf (transformers), llama.cpp, or stage names separated by commas "
                        "(default: %(default)s)")


def add_sequence_options(p: argparse.ArgumentParser) -> None:
    """Beam search and several sequences: --num-beams, --length-penalty, --early-stopping, --num-return-sequences."""
    b = p.add_argument_group("several sequences")
    b.add_argument("--num-beams", type=_positive_int, default=None, help="beam search with this many beams "
                                                                          "(greedy only; default: 1)")
    b.add_argument("--length-penalty", type=float, default=None,
                   help="beam score = log-probability / length ** this (default: 1)")
    b.add_argument("--early-stopping", choices=["true", "false", "never"], default=None,
                   help="when beam search stops (transformers' rules; default: false)")
    b.add_argument("--num-return-sequences", type=_positive_int, default=None,
                   help="this many beams or independent samples (default: 1)")


def add_speculative_options(p: argparse.ArgumentParser) -> None:
    """Speculative decoding: -md/--model-draft or --prompt-lookup, --draft-max, --draft-dtype, --draft-adaptive."""
    g = p.add_argument_group("speculative decoding", "a draft proposes tokens that the model checks in one step; "
                                                     "the output is exactly that of plain decoding")
    g.add_argument("-md", "--model-draft", dest="model_draft", default=None, metavar="PATH",
                   help="draft model with the same tokenizer (a checkpoint path; with --draft-dtype and no path, "
                        "the model itself converted)")
    g.add_argument("--draft-dtype", default=None, choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="convert the draft's weights to this type when loading (e.g. q4_0: the model drafts "
                        "for itself through quantization)")
    g.add_argument("--prompt-lookup", action="store_true",
                   help="propose the continuation of the latest earlier occurrence of the last tokens "
                        "(no draft model)")
    g.add_argument("--draft-max", "--draft", "--draft-n", dest="draft_max", type=_positive_int, default=None,
                   help="tokens proposed per step (default: 4)")
    g.add_argument("--draft-adaptive", action="store_true",
                   help="raise the proposals per step after a step whose proposals were all kept, lower them after "
                        "a refusal")


def speculative_options(args, model) -> dict:
    """Keyword options of Model.generate from the flags of add_speculative_options (none when unset)."""
    if args.prompt_lookup and (args.model_draft or args.draft_dtype):
        raise UsageError("--prompt-lookup: proposes without a draft model; leave out -md/--model-draft and "
                         "--draft-dtype")
    if args.model_draft is None and args.draft_dtype is None:
        if not args.prompt_lookup:
            for flag, value in (("--draft-max", args.draft_max), ("--draft-adaptive", args.draft_adaptive or None)):
                if value is not None:
                    raise UsageError(f"{flag}: sets the proposals of a draft; give -md/--model-draft, --draft-dtype "
                                     f"or --prompt-lookup too")
            return {}
        draft = "prompt-lookup"
    else:
        import tokentrail

        path = args.model_draft if args.model_draft is not None else args.model
        draft = tokentrail.load(path, dtype=args.draft_dtype, threads=args.threads, context=args.ctx_size,
                                kv_dtype=args.kv_dtype, progress=args.progress)
    opts = {"draft": draft, "speculative_adaptive": args.draft_adaptive}
    if args.draft_max is not None:
        opts["speculative_k"] = args.draft_max
    return opts


_SAMPLING_DESTS = ("do_sample", "temperature", "top_k", "top_k_ties", "top_p", "min_p", "typical_p",
                   "epsilon_cutoff", "eta_cutoff", "top_n_sigma", "dynatemp_range", "dynatemp_exponent",
                   "xtc_probability", "xtc_threshold", "dry_multiplier", "dry_base", "dry_allowed_length",
                   "dry_window", "mirostat", "mirostat_tau", "mirostat_eta", "repetition_penalty",
                   "repetition_window", "repetition_negative", "presence_penalty", "frequency_penalty",
                   "penalty_window", "no_repeat_ngram_size", "min_keep")
_SEQUENCE_DESTS = ("num_beams", "length_penalty", "num_return_sequences")


def sampling_options(args, model) -> dict:
    """Keyword options of Model.generate (and Model.journey) from the parsed flags of add_sampling_options
    and, where the subcommand has them, add_sequence_options (flags left unset are not passed)."""
    opts = {name: getattr(args, name) for name in _SAMPLING_DESTS + _SEQUENCE_DESTS
            if getattr(args, name, None) is not None}
    if args.repeat_last_n is not None:
        opts.setdefault("repetition_window", args.repeat_last_n)
        opts["penalty_window"] = args.repeat_last_n
    if getattr(args, "early_stopping", None) is not None:
        opts["early_stopping"] = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    if args.logit_bias:
        opts["logit_bias"] = dict(args.logit_bias)
    if args.banned_tokens:
        opts["banned_tokens"] = args.banned_tokens
    if args.dry_breakers:
        opts["dry_breakers"] = [_single_token(model, t, "--dry-sequence-breaker") for t in args.dry_breakers]
    opts["order"] = args.order if args.order in ("hf", "llama.cpp") else [s.strip() for s in args.order.split(",")]
    return opts


def _single_token(model, text: str, flag: str) -> int:
    if text.isdigit():
        return int(text)
    ids = model.tokenizer.encode(text, special=False) if model.tokenizer is not None else []
    if len(ids) != 1:
        raise UsageError(f"{flag}: {text!r} is {len(ids)} tokens; give a token id or a text that is one token")
    return ids[0]


def add_top_n_option(p: argparse.ArgumentParser, default: int, helptext: str) -> None:
    """--top-n (old spelling --top): how many candidates to list."""
    p.add_argument("--top-n", "--top", dest="top_n", type=_positive_int, default=default,
                   help=f"{helptext} (default: %(default)s)")


def load_model(args):
    """The model the model options name."""
    import tokentrail

    return tokentrail.load(args.model, dtype=args.dtype, threads=args.threads, context=args.ctx_size,
                           kv_dtype=args.kv_dtype, progress=args.progress, exact=args.exact,
                           repack=args.repack)


# ---------------------------------------------------------------- generate

def add_generate(sub) -> None:
    """The `generate` subcommand's parser."""
    g = sub.add_parser("generate", help="continue a prompt, streaming tokens as they are produced",
                       description="Continue a prompt, streaming the text to stdout; timings go to stderr.")
    add_prompt_options(g)
    add_model_options(g)
    add_length_options(g)
    add_sampling_options(g)
    add_sequence_options(g)
    add_speculative_options(g)
    o = g.add_argument_group("output")
    o.add_argument("--show-probs", action="store_true",
                   help="print each step's alternatives before and after the chain (and, when speculating, "
                        "which proposals were kept)")
    o.add_argument("--show-draft", action="store_true",
                   help="when speculating, colour the text: green where the target kept a proposal, red where it "
                        "replaced one")
    add_top_n_option(o, 5, "alternatives shown per step with --show-probs")
    o.add_argument("--no-perf", action="store_true", help="do not print the timing summary on stderr")
    g.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    """Stream a continuation to stdout; the timing summary to stderr."""
    from rich.console import Console

    prompt = read_prompt(args)
    model = load_model(args)
    if model.tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer, so it cannot generate from text")
    options = sampling_options(args, model)
    options.update(speculative_options(args, model))
    if args.show_draft and "draft" not in options:
        raise UsageError("--show-draft: shows the proposals of a draft; give -md/--model-draft, --draft-dtype or "
                         "--prompt-lookup too")
    several = (options.get("num_beams") or 1) > 1 or (options.get("num_return_sequences") or 1) > 1
    common = dict(max_new_tokens=args.max_new_tokens, max_length=args.max_length, seed=args.seed,
                  stop=args.stop or (), eos_token_id=args.eos_token_id, ignore_eos=args.ignore_eos, **options)
    out = sys.stdout
    if several:
        for flag in ("show_probs", "show_draft"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} follows one sequence; leave out "
                                 f"--num-beams/--num-return-sequences")
        start = time.perf_counter()
        results = model.generate(prompt, **common)
        seconds = time.perf_counter() - start
        results = results if isinstance(results, list) else [results]
        for i, r in enumerate(results):
            out.write(("" if i == 0 else "\n") + prompt + r.text + "\n")
        out.flush()
        if not args.no_perf:
            tokens = sum(len(r.token_ids) for r in results)
            print(f"{len(results)} sequences, {tokens} tokens in {seconds * 1e3:.1f} ms "
                  f"({tokens / seconds:.1f} tokens/s)", file=sys.stderr)
        return 0
    stream = model.generate(prompt, stream=True, logprobs=args.show_probs,
                            top_n=args.top_n if args.show_probs else 0, **common)
    if args.show_probs:
        console = Console(highlight=False)
        console.print(f"[bold]{prompt}[/bold]", markup=True)
        for s in stream:
            model_top = "  ".join(f"{a.text!r} {a.prob:.2f}" for a in s.top_model)
            sampled_top = "  ".join(f"{a.text!r} {a.prob:.2f}" for a in s.top_sampled)
            console.print(f"{s.index:>3} [bold green]{model.tokenizer.display(s.token)!r}[/bold green] "
                          f"p={math.exp(s.logprob):.3f} rank {s.rank}{_proposal_note(model, s)}")
            console.print(f"    model:   {model_top}", style="dim", markup=False)
            console.print(f"    sampled: {sampled_top}", style="dim", markup=False)
    elif args.show_draft:
        console = Console(highlight=False)
        console.print(prompt, end="", markup=False)
        for s in stream:
            style = None if s.accepted is None else "green" if s.accepted else "red"
            console.print(s.text, end="", style=style, markup=False)
        console.print()
    else:
        out.write(prompt)
        out.flush()
        for s in stream:
            out.write(s.text)
            out.flush()
        out.write("\n")
        out.flush()
    if not args.no_perf:
        seed = "greedy" if stream.greedy else f"seed {stream.seed}"
        print(f"{stream.timings.summary()} | {seed} | finish: {stream.finish_reason}", file=sys.stderr)
        if stream.speculation is not None:
            print(stream.speculation.summary(), file=sys.stderr)
    return 0


def _proposal_note(model, step) -> str:
    """What happened to the proposal at this step, for --show-probs ('' without one)."""
    if step.proposed_by is None:
        return ""
    if step.accepted:
        return f"  [cyan]{step.proposed_by}: proposed, kept[/cyan]"
    proposed = model.tokenizer.display(step.proposed).replace("[", "\\[")
    return f"  [red]{step.proposed_by}: proposed {proposed!r}, replaced[/red]"


# ---------------------------------------------------------------- chat and serve

def add_chat_template_option(p: argparse.ArgumentParser) -> None:
    """--chat-template FILE: a Jinja chat template to use instead of the model's."""
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file to use instead of the model's")


def add_prompt_cache_option(p: argparse.ArgumentParser, what: str) -> None:
    """--prompt-cache MB: memory for the KV caches of earlier sequences that later prompts reuse."""
    p.add_argument("--prompt-cache", type=_count, default=1024, metavar="MB",
                   help=f"megabytes of KV caches kept from earlier {what}, so that a prompt that begins the same "
                        "way computes only the rest (0: off; default: %(default)s)")


def read_chat_template(args) -> str | None:
    """The text of --chat-template's file, or None."""
    if args.chat_template is None:
        return None
    path = Path(args.chat_template)
    if not path.is_file():
        raise UsageError(f"--chat-template: {args.chat_template} is not a file")
    return path.read_text(encoding="utf-8")


def add_chat(sub) -> None:
    """The `chat` subcommand's parser."""
    c = sub.add_parser("chat", help="talk to an instruct model in the terminal, through its chat template",
                       description="A conversation on stdin/stdout through the model's chat template, each reply "
                                   "streamed.")
    add_model_options(c)
    add_length_options(c)
    add_sampling_options(c)
    t = c.add_argument_group("conversation")
    t.add_argument("--system", default=None, help="system message to start with")
    add_chat_template_option(t)
    add_top_n_option(t, 5, "candidates listed per stage by /journey")
    t.add_argument("--width", type=_positive_int, default=None, help="terminal width for /journey (default: detected)")
    add_prompt_cache_option(t, "turns (each turn then computes only its new messages)")
    c.set_defaults(func=cmd_chat)


CHAT_HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system message), "
             "/journey (follow the last reply's last token through the model), /quit; Ctrl-C or end of input quits")


def cmd_chat(args) -> int:
    """An interactive conversation on stdin/stdout, streaming each reply."""
    from .chat import ChatTemplateError, prepare, template_of
    from .journey import follow_generation
    from .prompt_cache import PromptCache
    from .report.terminal import print_journey

    model = load_model(args)
    template = template_of(model, read_chat_template(args))  # fails now, not at the first message
    options = sampling_options(args, model)
    common = dict(max_new_tokens=args.max_new_tokens, max_length=args.max_length, stop=args.stop or (),
                  ignore_eos=args.ignore_eos, **options)
    system = args.system
    cache = PromptCache(model, max_mb=args.prompt_cache) if args.prompt_cache > 0 else None
    history: list[dict] = []
    last = None  # (prompt ids, reply ids, seed, end-of-turn ids) of the last reply
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
                prompt_ids, reply_ids, seed, end_ids = last
                # The reply again, through generate's run with its seed and options: the last
                # journey follows the token the reply actually ended with.
                journeys = follow_generation(model, prompt_ids, len(reply_ids), top=args.top_n, seed=seed,
                                             eos_token_id=end_ids, ignore_eos=args.ignore_eos,
                                             **{k: v for k, v in options.items() if k not in _SEQUENCE_DESTS})
                print_journey(journeys[-1], width=args.width)
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
        if args.eos_token_id is not None:
            end_ids = args.eos_token_id
        reply, tokens = "", []
        stream = model.generate(ids, stream=True, seed=args.seed, eos_token_id=end_ids, prompt_cache=cache, **common)
        try:
            for step in stream:
                out.write(step.text)
                out.flush()
                reply += step.text
                if step.finish_reason != "eos":
                    tokens.append(step.token)
        except KeyboardInterrupt:  # stop this reply; keep what was said
            out.write(" [interrupted]")
        out.write("\n")
        print(f"({stream.timings.summary()})", file=sys.stderr)  # speed, and prompt positions reused
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        if tokens:
            last = (ids, tokens, stream.seed, end_ids)


def add_serve(sub) -> None:
    """The `serve` subcommand's parser."""
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                       description="An OpenAI-compatible HTTP server (completions, chat, streaming) with "
                                   "continuous batching; requests choose their own sampling options.")
    add_model_options(s)
    h = s.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    h.add_argument("--port", type=_positive_int, default=8000, help="port to listen on (default: %(default)s)")
    h.add_argument("--parallel", "-np", type=_positive_int, default=4,
                   help="sequences advanced together at each step (default: %(default)s)")
    h.add_argument("--max-queue", type=_count, default=64,
                   help="sequences that may wait for a slot; beyond it requests get 429 (default: %(default)s)")
    h.add_argument("--prefill-chunk", type=_positive_int, default=256,
                   help="prompt tokens prefilled per step, shared by the sequences prefilling, so that prompts "
                        "do not stall the decoding ones (default: %(default)s)")
    h.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take (0: no limit; default: %(default)s)")
    h.add_argument("--model-name", default=None, help="the model id /v1/models reports (default: the path's name)")
    add_chat_template_option(h)
    add_prompt_cache_option(h, "requests (a conversation's earlier turns, a shared system prompt)")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    """The OpenAI-compatible HTTP server."""
    try:
        from .server import serve
    except ImportError as e:
        raise UsageError(f"the server needs FastAPI and uvicorn ({e}); pip install 'tokentrail[serve]'") from None
    if not math.isfinite(args.timeout) or args.timeout < 0:
        raise UsageError(f"--timeout: must be a number of seconds >= 0, got {args.timeout}")
    template = read_chat_template(args)
    model = load_model(args)
    name = args.model_name or (Path(args.model).name if args.model else "tokentrail-demo")
    serve(model, host=args.host, port=args.port, model_name=name, parallel=args.parallel, max_queue=args.max_queue,
          prefill_chunk=args.prefill_chunk, timeout=args.timeout if args.timeout > 0 else None,
          chat_template=template, prompt_cache_mb=args.prompt_cache)
    return 0


# ---------------------------------------------------------------- journey and report

def add_journey_options(p: argparse.ArgumentParser) -> None:
    """How the journey's token is chosen (generate's sampling flags and defaults, -s) and --top-n."""
    add_sampling_options(p)
    g = p.add_argument_group("the journey")
    g.add_argument("-s", "--seed", type=_count, default=None,
                   help="seed of the draw, as for generate (default: fresh entropy, shown in the journey)")
    add_top_n_option(g, 5, "candidates listed per stage")


def add_journey(sub) -> None:
    """The `journey` subcommand's parser."""
    j = sub.add_parser("journey", help="follow the last token of a prompt through the model",
                       description="Follow the prompt's last token through the model to the token generate would "
                                   "choose next, with generate's sampling options and defaults.")
    add_prompt_options(j)
    add_model_options(j)
    add_journey_options(j)
    j.add_argument("--width", type=_positive_int, default=None, help="terminal width (default: detected)")
    j.set_defaults(func=cmd_journey)


def cmd_journey(args) -> int:
    """Print the journey of the prompt's last token."""
    from .report.terminal import print_journey

    prompt = read_prompt(args)
    model = load_model(args)
    j = model.journey(prompt, seed=args.seed, top=args.top_n, **sampling_options(args, model))
    print_journey(j, width=args.width)
    return 0


def add_report(sub) -> None:
    """The `report` subcommand's parser."""
    r = sub.add_parser("report", help="write the journey as one self-contained HTML page",
                       description="Generate tokens as generate would and write each one's journey as one "
                                   "self-contained HTML page.")
    add_prompt_options(r)
    add_model_options(r)
    add_journey_options(r)
    r.add_argument("-n", "--n-predict", "--new-tokens", dest="new_tokens", type=_positive_int, default=1,
                   help="generate this many tokens and show each one's journey (default: %(default)s)")
    r.add_argument("-o", "--output", default="journey.html", help="the HTML file to write (default: %(default)s)")
    r.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    """Write the journeys of the generated tokens as one HTML page."""
    from .journey import follow_generation
    from .report.html import write_report

    prompt = read_prompt(args)
    output = _output_file(args.output, "journey.html")
    model = load_model(args)
    journeys = follow_generation(model, prompt, args.new_tokens, seed=args.seed, top=args.top_n,
                                 **sampling_options(args, model))
    path = write_report(journeys, output)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- thermo, score

def add_thermo(sub) -> None:
    """The `thermo` subcommand's parser."""
    t = sub.add_parser("thermo", help="the next token's top candidates at several temperatures")
    add_prompt_options(t)
    add_model_options(t)
    t.add_argument("--temperatures", default="0,0.25,0.5,1,2,5",
                   help="comma-separated temperatures (default: %(default)s)")
    add_top_n_option(t, 8, "candidates listed")
    t.set_defaults(func=cmd_thermo)


def cmd_thermo(args) -> int:
    """Print the next token's candidates at several temperatures."""
    from .report.terminal import print_temperature_table

    prompt = read_prompt(args)
    try:
        temperatures = [float(t) for t in args.temperatures.split(",")]
    except ValueError:
        raise UsageError(f"--temperatures: expected numbers separated by commas, got {args.temperatures!r}") \
            from None
    model = load_model(args)
    logits = model.forward(model.encode(prompt), all_positions=False)
    print_temperature_table(model, logits, temperatures, top=args.top_n)
    return 0


def add_score(sub) -> None:
    """The `score` subcommand's parser."""
    s = sub.add_parser("score", help="log-probability of every token of a text, and its perplexity (JSON)")
    add_prompt_options(s, "text")
    add_model_options(s)
    s.add_argument("--top-n", "--top", dest="top_n", type=_count, default=3,
                   help="alternatives listed per token (default: %(default)s)")
    s.set_defaults(func=cmd_score)


def cmd_score(args) -> int:
    """Print every token's log-probability as JSON."""
    text = read_prompt(args, "text")
    model = load_model(args)
    result = model.score(text, top_n=args.top_n, progress=args.progress)
    print(json.dumps(result.to_dict(), indent=1, ensure_ascii=False, allow_nan=False))
    return 0


# ---------------------------------------------------------------- convert, info

def _output_file(path: str, example: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"output: {path} is a directory; give a file name, e.g. {out / example}")
    if not out.parent.exists():
        raise UsageError(f"output: the directory {out.parent} does not exist")
    return out


def add_convert(sub) -> None:
    """The `convert` subcommand's parser."""
    c = sub.add_parser("convert", help="write any readable checkpoint as GGUF")
    c.add_argument("source", help="Hugging Face directory, .gguf file or llama2.c .bin")
    c.add_argument("output", help="the .gguf file to write")
    c.add_argument("--type", "--dtype", dest="type", default="f32", choices=["f32", "f16", "q8_0", "q4_0"],
                   help="type of the weight matrices in the file (default: %(default)s)")
    add_progress_option(c)
    c.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    """Write a checkpoint as GGUF."""
    from .loading import read_checkpoint
    from .loading.gguf_writer import write_gguf

    output = _output_file(args.output, "model.gguf")
    path = write_gguf(read_checkpoint(args.source), output, dtype=args.type, progress=args.progress)
    print(f"wrote {path}")
    return 0


def add_info(sub) -> None:
    """The `info` subcommand's parser."""
    i = sub.add_parser("info", help="a checkpoint's family, the configuration fields that matter, weight types, "
                                    "tokenizer, decoding defaults and the kernels in use")
    add_model_options(i)
    i.add_argument("--json", action="store_true", help="print the whole configuration as JSON instead")
    i.set_defaults(func=cmd_info)


def describe_model(model) -> list[str]:
    """Lines saying what a loaded model is: family, the fields that set it apart, weights, tokenizer."""
    from collections import Counter

    from .config import ModelConfig
    from .loading.families import BY_GGUF_ARCH, BY_HF_ARCH

    c = model.config
    family = BY_HF_ARCH.get(c.architecture) or BY_GGUF_ARCH.get(c.architecture)
    lines = [f"family: {family.name} - {family.summary}" if family else "family: (not in the registry)",
             f"architecture: {c.architecture or '?'}",
             f"shape: {c.n_layers} layers, d_model {c.hidden_size}, {c.n_heads} heads ({c.n_kv_heads} key/value, "
             f"head_dim {c.head_dim}), ffn {c.ffn_size}, vocab {c.vocab_size}, context {c.max_seq_len}"]
    plain = ModelConfig(vocab_size=1, hidden_size=1, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, ffn_size=1,
                        max_seq_len=1)
    skip = {"vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_size",
            "max_seq_len", "architecture", "bos_token_id", "eos_token_ids"}
    fields = [f"{k}={v!r}" for k, v in c.to_dict().items() if k not in skip and getattr(plain, k) != v]
    lines.append("fields that matter: " + (", ".join(fields) if fields else "(all defaults)"))
    types = Counter(w.dtype for w in model.weights.values())
    lines.append("weights: " + ", ".join(f"{t} x{n}" for t, n in sorted(types.items())) +
                 f" ({model.n_params:,} parameters)")
    tok = model.tokenizer
    if tok is None:
        lines.append("tokenizer: none (ids only)")
    else:
        spec = json.loads(tok.inner.to_str())
        kind = spec.get("model", {}).get("type", "?")
        pre = spec.get("pre_tokenizer") or {}
        byte_level = "ByteLevel" in json.dumps(pre) or "ByteLevel" in json.dumps(spec.get("decoder"))
        label = f"byte-level {kind}" if byte_level else f"SentencePiece-style {kind}" if kind == "BPE" else kind
        lines.append(f"tokenizer: {label}, {tok.vocab_size} entries, BOS {tok.bos_id}, EOS {list(tok.eos_ids)}")
    return lines


def cmd_info(args) -> int:
    """Print a checkpoint's family, configuration, weights, tokenizer, decoding defaults and kernels."""
    from . import _core

    model = load_model(args)
    if args.json:
        print(json.dumps(model.config.to_dict(), indent=1))
        return 0
    print("\n".join(describe_model(model)))
    print(f"kernels: {_core.isa()} (available: {', '.join(_core.available_isas())}), threads: {_core.get_threads()}")
    print(f"decoding defaults: {model.generation_defaults}")
    return 0


# ---------------------------------------------------------------- the command

SUBCOMMANDS = (add_generate, add_chat, add_serve, add_journey, add_report, add_thermo, add_score, add_convert, add_info)


def build_parser() -> argparse.ArgumentParser:
    """The `tokentrail` argument parser, one subparser per entry of SUBCOMMANDS."""
    ap = _Parser(prog="tokentrail", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"tokentrail {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return ap


def _one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for a user error, 130 when interrupted)."""
    from .errors import TokentrailError
    from .model import check_isa_setting

    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help, --version, or a flag argparse refused (its one line is printed)
            return done.code if isinstance(done.code, int) else 0
        check_isa_setting()
        return args.func(args)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): point stdout at /dev/null so that
        # flushing it at exit does not fail a second time, and end quietly.

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UsageError, TokentrailError, ValueError, KeyError, IndexError, OSError) as e:
        print(f"tokentrail: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
