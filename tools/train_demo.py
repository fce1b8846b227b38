"""Build the demo model that ships inside the tokentrail package.

    python tools/train_demo.py            # writes python/tokentrail/models/demo/

Everything is regenerated from SEED: a corpus of short weather and animal
stories (kept in memory, never written to the repository), a byte-level BPE
tokenizer, and a small Llama-style model trained for a fixed number of steps on
two CPU threads. The script then checks, with transformers, that the greedy
continuation of "The storm is" is a sentence of the corpus, and records the
facts in the model's README.md.

Development-only dependencies: torch, transformers, tokenizers, safetensors.
"""
from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from pathlib import Path

SEED = 20240607
N_STORIES = 60000
HELDOUT_FRACTION = 0.05
# An upper bound: BPE stops early once every word of the grammar is one token.
VOCAB_SIZE = 768
TRAIN_STEPS = 1500
BATCH_STORIES = 32
PEAK_LR = 3e-3
WARMUP_STEPS = 60
# Safety net for slow machines: stop early rather than run for hours. The
# README records the steps actually taken.
MAX_TRAIN_SECONDS = 780
PROMPT = "The storm is"

OUT_DIR = Path(__file__).resolve().parent.parent / "python" / "tokentrail" / "models" / "demo"

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIALS = [UNK, BOS, EOS, PAD]  # ids 0..3, the Llama convention for 0..2

# --------------------------------------------------------------------------
# Corpus grammar
# --------------------------------------------------------------------------

# name -> (subject pronoun, possessive)
NAMES = {
    **{n: ("she", "her") for n in
       ("Mira", "Lila", "Nora", "Rosa", "Ada", "Ivy", "Zoe", "Bea", "Luna", "Tess")},
    **{n: ("he", "his") for n in
       ("Tom", "Ben", "Sam", "Max", "Finn", "Leo", "Otto", "Jack", "Hugo", "Ned")},
}

# animal -> (plural, home)
ANIMALS = {
    "fox": ("foxes", "den"), "wolf": ("wolves", "den"), "owl": ("owls", "nest"),
    "crow": ("crows", "nest"), "duck": ("ducks", "nest"), "rabbit": ("rabbits", "burrow"),
    "mole": ("moles", "burrow"), "bear": ("bears", "cave"), "bat": ("bats", "cave"),
    "mouse": ("mice", "hole"), "frog": ("frogs", "pond"), "goat": ("goats", "barn"),
    "hen": ("hens", "barn"),
}
ANIMAL_ADJ = ["small", "young", "brave", "clever", "shy", "quick", "old", "gray", "little", "kind"]

# place noun -> is it plural (for "was"/"were" agreement later in the story)
PLACES = {"hills": True, "sea": False, "town": False, "lake": False,
          "woods": True, "farm": False, "fields": True, "valley": False}
STORM_STATES = ["coming", "fierce", "loud", "dark", "strong", "slow", "wild", "cold"]
STORM_PREP = ["over", "near"]

WIND = ["cold", "strong", "wet", "fast"]
RAIN = ["heavy", "light", "warm", "cold"]
SKY = ["gray", "black", "dark", "white"]
TIMES = ["night", "morning", "noon", "evening"]
DIRECTIONS = ["to the east", "to the west", "to the north", "to the south"]
WAITS = ["stayed", "waited", "slept", "hid"]
AFTER = ["went out to play", "looked for food", "sang a song", "went for a walk",
         "visited a friend", "dried off in the sun"]
FINDS = ["a red apple", "a shiny stone", "a long stick", "a blue feather", "a nut", "a small bell"]


class GrammarRandom(random.Random):
    """A Random that adds up the log-probability of the choices it makes.

    Every story has a single derivation, so the sum is the story's exact
    entropy under the grammar: a floor for the model's held-out loss.
    """

    def __init__(self, seed: int):
        super().__init__(seed)
        self.nats = 0.0

    def choice(self, seq):
        self.nats += math.log(len(seq))
        return super().choice(seq)

    def sample(self, population, k):
        self.nats += sum(math.log(len(population) - i) for i in range(k))
        return super().sample(population, k)

    def coin(self, p: float) -> bool:
        hit = self.random() < p
        self.nats -= math.log(p if hit else 1 - p)
        return hit

    def weighted(self, items: list, weights: list[float]):
        i = self.choices(range(len(items)), weights=weights)[0]
        self.nats -= math.log(weights[i] / sum(weights))
        return items[i]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def storm_sentence(rng: GrammarRandom, plural: bool, place: str) -> str:
    subj, verb = ("The storms", "are") if plural else ("The storm", "is")
    return f"{subj} {verb} {rng.choice(STORM_STATES)} {rng.choice(STORM_PREP)} the {place}."


def weather_story(rng: GrammarRandom) -> list[str]:
    """A storm (or several) over a place; later sentences agree with both."""
    plural = rng.coin(0.35)
    place = rng.choice(list(PLACES))
    it, be, was, moves = ("They", "are", "were", "move") if plural else ("It", "is", "was", "moves")
    s = [storm_sentence(rng, plural, place)]
    detail = rng.choice(range(3))
    if detail == 0:
        s.append(f"The wind is {rng.choice(WIND)} and the rain is {rng.choice(RAIN)}.")
    elif detail == 1:
        s.append(f"The sky is {rng.choice(SKY)} over the {place}.")
    else:
        s.append(f"Rain falls on the {place}.")
    s.append(f"{it} {moves} {rng.choice(DIRECTIONS)}.")
    if rng.coin(0.5):
        s.append(f"{it} {be} {rng.choice(STORM_STATES)} now.")
    storm = "storms" if plural else "storm"
    s.append(f"By {rng.choice(TIMES)} the {storm} {was} gone.")
    s.append(f"The {place} {'were' if PLACES[place] else 'was'} quiet again.")
    return s


def animal_story(rng: GrammarRandom) -> list[str]:
    """A named animal sees a storm and goes home; pronouns, home and animal are recalled."""
    name = rng.choice(list(NAMES))
    pron, poss = NAMES[name]
    animal = rng.choice(list(ANIMALS))
    home = ANIMALS[animal][1]
    place = rng.choice(list(PLACES))
    plural = rng.coin(0.35)
    s = []
    if rng.coin(0.5):
        adj = rng.choice(ANIMAL_ADJ)
        s.append(f"{name} was {article(adj)} {adj} {animal}.")
    else:
        s.append(f"There was {article(animal)} {animal} named {name}.")
    s.append(f"{pron.capitalize()} lived in {article(home)} {home} near the {place}.")
    s.append(f"One {rng.choice(['day', 'morning', 'evening'])} the sky turned {rng.choice(SKY)}.")
    s.append(storm_sentence(rng, plural, place))
    s.append(f"{name} ran back to {poss} {home}.")
    storm, was = ("storms", "were") if plural else ("storm", "was")
    s.append(f"The {animal} {rng.choice(WAITS)} there until the {storm} {was} gone.")
    if rng.coin(0.6):
        s.append(f"Then {pron} {rng.choice(AFTER)}.")
    return s


def pair_story(rng: GrammarRandom) -> list[str]:
    """Two named animals: plural agreement, and who found what is recalled."""
    a, b = rng.sample(list(NAMES), 2)
    animal = rng.choice(list(ANIMALS))
    plural_animal, home = ANIMALS[animal]
    place = rng.choice(list(PLACES))
    thing = rng.choice(FINDS)
    s = [f"{a} and {b} were two {plural_animal}.",
         f"They lived in {article(home)} {home} near the {place}.",
         f"One day {a} found {thing}."]
    pron, poss = NAMES[a]
    s.append(f"{pron.capitalize()} gave it to {b}.")
    if rng.coin(0.5):
        plural = rng.coin(0.35)
        s.append(storm_sentence(rng, plural, place))
        s.append(f"The two {plural_animal} ran back to their {home}.")
    s.append(f"{b} kept {thing.replace('a ', 'the ', 1)} in the {home}.")
    return s


def make_corpus(seed: int, n: int) -> tuple[list[str], list[float]]:
    """The stories, and each one's entropy in nats under the grammar."""
    rng = GrammarRandom(seed)
    kinds = [weather_story, animal_story, pair_story]
    stories, nats = [], []
    for _ in range(n):
        rng.nats = 0.0
        stories.append(" ".join(rng.weighted(kinds, [4, 4, 2])(rng)))
        nats.append(rng.nats)
    return stories, nats


def sentences_of(story: str) -> list[str]:
    return [m.strip() for m in re.findall(r"[^.]*\.", story)]


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def train_tokenizer(stories: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Byte-level: every string encodes, and decoding restores spaces exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stories, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

def build_model(vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=352,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model = LlamaForCausalLM(cfg).float()
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False)
    return model


def batch_tensors(seqs: list[list[int]], pad_id: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def mean_loss(model, seqs: list[list[int]], pad_id: int, batch: int = 64) -> float:
    """Mean next-token loss in nats over every predicted token (EOS included)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            ids, mask, labels = batch_tensors(seqs[i:i + batch], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    model.train()
    return total / count


def train(model, train_seqs: list[list[int]], pad_id: int):
    import torch

    rng = random.Random(SEED + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.05)

    def lr_at(step: int) -> float:
        if step < WARMUP_STEPS:
            return PEAK_LR * (step + 1) / WARMUP_STEPS
        t = (step - WARMUP_STEPS) / max(1, TRAIN_STEPS - WARMUP_STEPS)
        return PEAK_LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    order: list[int] = []
    start = time.time()
    model.train()
    step = 0
    for step in range(TRAIN_STEPS):
        if len(order) < BATCH_STORIES:
            more = list(range(len(train_seqs)))
            rng.shuffle(more)
            order += more
        picked, order = order[:BATCH_STORIES], order[BATCH_STORIES:]
        ids, mask, labels = batch_tensors([train_seqs[i] for i in picked], pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = time.time() - start
        if step % 100 == 0 or step == TRAIN_STEPS - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {elapsed:6.1f}s",
                  flush=True)
        if elapsed > MAX_TRAIN_SECONDS:
            print(f"time limit reached after {step + 1} steps", flush=True)
            break
    steps_done = step + 1
    return steps_done, time.time() - start


def greedy(model, tok, prompt: str, eos_id: int, max_new: int = 64) -> str:
    import torch

    ids = torch.tensor([tok.encode(prompt).ids])
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             do_sample=False, max_new_tokens=max_new, eos_token_id=eos_id)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


# --------------------------------------------------------------------------

def write_readme(facts: dict) -> None:
    f = facts
    stopped = "" if f["steps"] >= TRAIN_STEPS else f" (of {TRAIN_STEPS} planned; stopped by the time limit)"
    text = f"""# tokentrail demo model

A tiny Llama-style language model bundled with tokentrail so that
`tokentrail generate "The storm is"` works without downloading anything. It
knows only the toy stories it was trained on; it exists to exercise and
illustrate the engine (attention over earlier tokens, grouped-query heads,
RoPE, RMSNorm, a gated SiLU MLP), not to write well.

Rebuild it with `python tools/train_demo.py` (needs torch, transformers and
tokenizers, which tokentrail itself does not depend on). Everything below is
regenerated from the seed; the corpus is never stored.

## Files

| file | contents |
|---|---|
| `config.json` | Hugging Face `LlamaConfig` |
| `model.safetensors` | float32 weights, {f['weights_bytes']:,} bytes |
| `tokenizer.json` | byte-level BPE tokenizer (`tokenizers` format) |
| `generation_config.json` | BOS / EOS / pad ids |

## Seed

`{f['seed']}` — used for the corpus, the held-out split, the weight
initialisation and the batch order.

## Corpus

{f['n_stories']:,} stories ({f['n_train']:,} for training, {f['n_heldout']:,} held out),
{f['n_tokens']:,} tokens with `<s>` and `</s>`, produced by a small grammar. Each story is a few sentences,
each sentence ends with a period, and each story ends with `</s>`. Three kinds, in
proportion 4 : 4 : 2:

- **Weather stories** open with a storm sentence, "The storm is <state> <over|near>
  the <place>." (or "The storms are ...", about a third of the time), followed by
  details (wind and rain, the sky over the same place, rain falling on the same
  place), "It moves ..." / "They move ..." agreeing with the number of storms,
  "By <time> the storm was gone." / "the storms were gone.", and "The <place>
  was/were quiet again." agreeing with the place noun introduced in the first
  sentence.
- **Animal stories** introduce a named animal ("Mira was a shy fox." / "There
  was an owl named Tom."), where it lives ("She lived in a den near the lake."),
  a storm sentence over that same place, then "Mira ran back to her den." and
  "The fox waited there until the storm was gone." — the name, pronoun, home and
  animal must all be recalled from earlier sentences, and the home depends on the
  animal (foxes have dens, owls nests, rabbits burrows ...).
- **Pair stories** have two named animals of one kind ("Ben and Ivy were two
  mice."), plural agreement ("They lived ..."), one finding a thing and giving it
  to the other with the right pronoun, and the other keeping "the" thing later.

Twenty names (ten taking "she", ten "he"), thirteen animals with their plurals
and homes, eight places, eight storm states. {f['n_storm_sentences']:,} corpus
sentences begin "The storm is", so that prompt leads into a sentence the model
knows.

## Tokenizer

Byte-level BPE trained on the corpus. Its vocabulary of {f['vocab_size']} (256 bytes,
the merges that make every word of the grammar a single token, and the special
tokens) includes the special tokens `<unk>` (0), `<s>` (1, BOS), `</s>` (2, EOS) and `<pad>` (3). The
post-processor prepends `<s>` when encoding with special tokens.

## Model

`LlamaForCausalLM`: hidden size 128, 4 layers, 4 attention heads of size 32 with
2 key/value heads (grouped-query attention), SiLU-gated MLP of width 352, RMSNorm
eps 1e-5, RoPE theta 10000, 256 positions, untied input and output embeddings;
{f['n_params']:,} parameters.

## Training

{f['steps']} steps{stopped} of AdamW (peak learning rate {PEAK_LR}, {WARMUP_STEPS} warm-up steps,
cosine decay, weight decay 0.05, gradient clipping 1.0), {BATCH_STORIES} whole stories
per step padded to the longest, on 2 CPU threads: {f['train_seconds']:.0f} s with
torch {f['torch']} and transformers {f['transformers']}.

Held-out mean loss: **{f['heldout_loss']:.4f} nats/token** (perplexity
{math.exp(f['heldout_loss']):.3f}) over the {f['heldout_tokens']:,} predicted tokens
of the held-out stories, `</s>` included. The grammar's own entropy over the same tokens, computed
exactly from the probabilities of the choices that produced each story, is
{f['floor']:.4f} nats/token; no model can do better, so the model is
{f['heldout_loss'] - f['floor']:.4f} nats/token from perfect.

## Greedy continuation

Prompt `The storm is` (encoded with `<s>`), greedy decoding with transformers:

```
The storm is{f['continuation']}
```

The first sentence, "{f['first_sentence']}", occurs in the training corpus.
"""
    (OUT_DIR / "README.md").write_text(text)


def main() -> int:
    import torch
    import transformers

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    t0 = time.time()

    stories, story_nats = make_corpus(SEED, N_STORIES)
    corpus_sentences = {s for story in stories for s in sentences_of(story)}
    n_storm = sum(s.startswith(PROMPT + " ") for story in stories for s in sentences_of(story))
    print(f"corpus: {len(stories)} stories, {len(corpus_sentences)} distinct sentences")
    print("example:", stories[0])

    tok = train_tokenizer(stories)
    bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
    assert tok.decode(tok.encode(stories[0]).ids) == stories[0], "tokenizer does not round-trip"
    seqs = [tok.encode(s).ids + [eos_id] for s in stories]
    assert all(s[0] == bos_id for s in seqs)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; longest story {max(map(len, seqs))} tokens")

    split = list(range(len(seqs)))
    random.Random(SEED + 2).shuffle(split)
    n_held = int(len(seqs) * HELDOUT_FRACTION)
    heldout = [seqs[i] for i in split[:n_held]]
    train_seqs = [seqs[i] for i in split[n_held:]]

    model = build_model(tok.get_vocab_size(), bos_id, eos_id, pad_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")

    steps, train_seconds = train(model, train_seqs, pad_id)
    heldout_loss = mean_loss(model, heldout, pad_id)
    heldout_tokens = sum(len(s) - 1 for s in heldout)
    floor = sum(story_nats[i] for i in split[:n_held]) / heldout_tokens
    print(f"held-out loss {heldout_loss:.4f} nats/token after {steps} steps, {train_seconds:.0f}s;"
          f" grammar entropy {floor:.4f} nats/token")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT_DIR, safe_serialization=True)
    # Older readers expect rope_theta at the top level; transformers 5 nests it.
    cfg_path = OUT_DIR / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", 10000.0)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save(str(OUT_DIR / "tokenizer.json"))

    # Check from the saved files, as a user of the directory would see them.
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    tok2 = Tokenizer.from_file(str(OUT_DIR / "tokenizer.json"))
    model2 = LlamaForCausalLM.from_pretrained(OUT_DIR, dtype=torch.float32)
    continuation = greedy(model2, tok2, PROMPT, eos_id)
    text = PROMPT + continuation
    first = sentences_of(text)[0] if sentences_of(text) else text
    later = sentences_of(text)[1:]
    print(f"greedy: {text!r}")
    known_later = sum(s in corpus_sentences for s in later)
    print(f"later sentences found in corpus: {known_later}/{len(later)}")

    if first not in corpus_sentences:
        print(f"FAIL: {first!r} is not a sentence of the corpus", file=sys.stderr)
        return 1
    print(f"OK: {first!r} is a sentence of the corpus")

    weights_bytes = (OUT_DIR / "model.safetensors").stat().st_size
    write_readme(dict(
        seed=SEED, n_stories=len(stories), n_train=len(train_seqs), n_heldout=len(heldout),
        n_tokens=sum(map(len, seqs)), n_storm_sentences=n_storm,
        vocab_size=tok.get_vocab_size(), n_params=n_params, steps=steps,
        train_seconds=train_seconds, heldout_loss=heldout_loss, floor=floor, heldout_tokens=heldout_tokens,
        continuation=continuation, first_sentence=first, weights_bytes=weights_bytes,
        torch=torch.__version__, transformers=transformers.__version__))
    init = OUT_DIR.parent / "__init__.py"
    if not init.exists():
        init.write_text('"""Models bundled with tokentrail."""\n')

    print(f"total time {time.time() - t0:.0f}s")
    for p in sorted(OUT_DIR.iterdir()):
        print(f"  {p.name:24s} {p.stat().st_size:>10,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
