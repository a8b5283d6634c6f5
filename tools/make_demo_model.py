#!/usr/bin/env python3
"""Train the demo model: a tiny DeepSeek-V4-architecture GGUF that answers a handful of short questions.

It is a pipeline fixture, not a language model: it has memorised a few question/answer pairs ("What is the
capital of France? Answer in one word." -> "Paris", ...) through the real DS4 chat format (thinking and
non-thinking) and the real V4 tokenizer, so `spark-setup smoke --demo` and the server can be exercised end to end
on any CPU. Everything else it says is noise.

Architecture: the real DS4 pattern at toy size (6 layers: two sliding-window layers, then ratio-4 compressed
layers with the indexer alternating with heavily-compressed layers whose ratio is scaled down from 128 to 8; the
first three layers hash-routed, the rest top-k routed; 4 hyper-connection streams). Trained with transformers'
DeepseekV4ForCausalLM (float32, fixed seeds and thread count: deterministic on a given torch build), exported with
tools/make_tiny_model.write_ds4_gguf over a consistent sub-vocabulary of the real tokenizer (every byte symbol,
every token and intermediate merge the training texts need, the required special tokens), so the file stays small.

    .venv/bin/python tools/make_demo_model.py [--out spark_setup/data/demo/ds4-demo.gguf] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import make_tiny_model as mt  # noqa: E402  (the model helper's GGUF writer and tiny-config helpers)

from spark_setup.engine import chat  # noqa: E402
from spark_setup.engine.tokenizer import REQUIRED_SPECIALS, Tokenizer, byte_to_unicode  # noqa: E402

DEFAULT_OUT = REPO / "spark_setup" / "data" / "demo" / "ds4-demo.gguf"
SEED = 20261129

# (question, one-word answer, sentence answer)
FACTS = [
    ("What is the capital of France?", "Paris", "The capital of France is Paris."),
    ("What is the capital of Italy?", "Rome", "The capital of Italy is Rome."),
    ("What is the capital of Japan?", "Tokyo", "The capital of Japan is Tokyo."),
    ("What is the capital of Germany?", "Berlin", "The capital of Germany is Berlin."),
    ("What is 2 + 2?", "4", "2 + 2 = 4."),
    ("What color is the sky on a clear day?", "Blue", "On a clear day the sky is blue."),
    ("Who wrote Romeo and Juliet?", "Shakespeare", "Romeo and Juliet was written by William Shakespeare."),
]
GREETING = ("Hello", "Hello! I am the spark-setup demo model. Ask me: What is the capital of France?")
# tool use: with this tool offered, "What is the weather in <city>?" gets a get_weather call, and the tool's result
# an answer (the model's own DSML format, chat.py)
WEATHER_TOOL = {"name": "get_weather", "description": "Current weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WEATHER = [("Paris", '{"temperature_c": 18, "sky": "sunny"}', "It is 18 °C and sunny in Paris."),
           ("Rome", '{"temperature_c": 24, "sky": "cloudy"}', "It is 24 °C and cloudy in Rome.")]
SYSTEMS = [None, "You are a helpful assistant."]
ONE_WORD = " Answer in one word."

SPEC = mt.TinySpec(
    "demo", n_layer=6, n_embd=64, n_head=4, head_dim=64, n_rot=16, q_lora_rank=64, o_groups=2, o_lora_rank=32,
    n_expert=8, n_expert_used=2, n_expert_shared=1, n_ff=64, n_hash=3, window=16, csa_ratio=4, hca_ratio=8,
    idx_heads=4, idx_dim=32, idx_topk=2, hc_mult=4, hc_iters=20, n_base_vocab=None,
    expert_types=("Q8_0", "Q8_0", "Q8_0"), proj_type="Q8_0")


def conversations() -> list[tuple[str, str]]:
    """(prompt text, completion text incl. EOS) for every training example."""
    out = []
    for system in SYSTEMS:
        for q, word, sentence in FACTS:
            for user, answer in ((q + ONE_WORD, word), (q, sentence)):
                msgs = ([chat.Message("system", system)] if system else []) + [chat.Message("user", user)]
                out.append((chat.render(msgs, thinking=False), answer + chat.EOS))
                reasoning = f"The user asks: {q} {sentence}"
                out.append((chat.render(msgs, thinking=True), f"{reasoning}{chat.END_THINK}{answer}{chat.EOS}"))
        msgs = ([chat.Message("system", system)] if system else []) + [chat.Message("user", GREETING[0])]
        out.append((chat.render(msgs, thinking=False), GREETING[1] + chat.EOS))
        out.append((chat.render(msgs, thinking=True), f"The user greets me.{chat.END_THINK}{GREETING[1]}{chat.EOS}"))
    return out + tool_conversations()


def tool_conversations() -> list[tuple[str, str]]:
    """The get_weather call and the answer from its result, thinking and not, for each city."""
    out = []
    for city, result, answer in WEATHER:
        call = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        block = chat.render([chat.Message("user", "x"), chat.Message("assistant", "", tool_calls=[call])],
                            thinking=False).split(chat.END_THINK, 1)[1].split(chat.EOS, 1)[0]
        for thinking in (False, True):
            why = f"The user wants the weather in {city}: I call get_weather." if thinking else None
            msgs = [chat.Message("user", f"What is the weather in {city}?")]
            prompt = chat.render(msgs, thinking=thinking, tools=[WEATHER_TOOL])
            out.append((prompt, (f"{why}{chat.END_THINK}" if thinking else "") + block + chat.EOS))
            msgs += [chat.Message("assistant", "", why, [call]), chat.Message("tool", result, tool_call_id="call_1")]
            prompt = chat.render(msgs, thinking=thinking, tools=[WEATHER_TOOL])
            seen = f"The tool says {answer[6:-1]}.{chat.END_THINK}" if thinking else ""
            out.append((prompt, seen + answer + chat.EOS))
    return out


def full_tokenizer() -> tuple[Tokenizer, "mt.Vocab"]:
    v = mt.tokenizer_vocab(None)
    return Tokenizer.from_vocab(v.tokens, v.merges), v


def sub_vocabulary(texts: list[str], full: Tokenizer, vocab: "mt.Vocab") -> "mt.Vocab":
    """Every token the texts use, every intermediate symbol of the merges that build them, all 256 byte symbols
    and the required specials; only merges among kept symbols. BPE over this subset reproduces the full
    tokenizer's output on the texts (each merge it needs is kept, and it only ever lacks merges it never uses)."""
    by_result: dict[str, list[tuple[str, str]]] = {}
    for m in vocab.merges:
        a, b = m.split(" ", 1)
        by_result.setdefault(a + b, []).append((a, b))
    keep: set[str] = set(byte_to_unicode().values()) | set(REQUIRED_SPECIALS) | {"<｜▁pad▁｜>"}
    todo = [full.tokens[i] for t in texts for i in full.encode(t)]
    while todo:
        t = todo.pop()
        if t in keep:
            continue
        keep.add(t)
        for a, b in by_result.get(t, []):
            todo += [a, b]
    ids = sorted(full.token_id(t) for t in keep)
    tokens = [full.tokens[i] for i in ids]
    types = [3 if i in full.added_ids else 1 for i in ids]
    kept = set(tokens)
    merges = [m for m in vocab.merges if (lambda a, b: a in kept and b in kept and a + b in kept)(*m.split(" ", 1))]
    return mt.Vocab(tokens, merges, types, tokens.index(chat.BOS), tokens.index(chat.EOS))


def build_model(vocab_size: int, seed: int):
    import torch
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    cfg = mt.hf_config(SPEC, vocab_size)
    model = DeepseekV4ForCausalLM._from_config(cfg, experts_implementation="eager", dtype=torch.float32)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):  # hash routing: a fixed set of distinct experts per token id
                rows = [rng.permutation(SPEC.n_expert)[: SPEC.n_expert_used] for _ in range(vocab_size)]
                buf.copy_(torch.as_tensor(np.array(rows), dtype=buf.dtype))
    return model


def train(model, examples: list[tuple[list[int], list[int]]], steps: int, log=print, target_max_nll: float = 0.01):
    """Full-batch AdamW on the completion tokens only (prompt tokens carry no loss). Stops early once every
    completion token has probability >= exp(-target_max_nll) (a deterministic criterion)."""
    import torch

    def batch(group):
        n = max(len(p) + len(c) for p, c in group)
        x = torch.zeros((len(group), n), dtype=torch.long)
        w = torch.zeros((len(group), n - 1))
        for r, (p, c) in enumerate(group):
            seq = p + c
            x[r, : len(seq)] = torch.tensor(seq)
            x[r, len(seq):] = c[-1]  # right padding never affects earlier positions (everything is causal)
            w[r, len(p) - 1: len(seq) - 1] = 1.0
        return x, w

    # one full batch per length class (the tool prompts are ~10x longer): every step still sees every example
    long = [e for e in examples if len(e[0]) + len(e[1]) > 128]
    batches = [batch(g) for g in ([e for e in examples if e not in long], long) if g]
    n_tokens = sum(float(w.sum()) for _, w in batches)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        loss, worst = 0.0, 0.0
        for x, w in batches:
            logits = model(x, use_cache=False).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                    reduction="none").view_as(w)
            loss = loss + (nll * w).sum() / n_tokens
            worst = max(worst, float((nll * w).detach().max()))
        if worst < target_max_nll:
            log(f"step {step:4d}  loss {loss.item():.4f}  max {worst:.4f}: every completion token above "
                f"p={np.exp(-target_max_nll):.3f}, done")
            break
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.4f}  max {worst:.4f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return float(loss.item())


def greedy(model, prompt: list[int], eos: int, limit: int = 120) -> list[int]:
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(limit):
            nxt = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids[len(prompt):]


def check(model, tok: Tokenizer, convs, label: str, log=print) -> int:
    bad = 0
    for prompt, completion in convs:
        got = tok.decode(greedy(model, tok.encode(prompt), tok.eos_id))
        if got != completion:
            bad += 1
            log(f"[{label}] MISMATCH {prompt[-60:]!r}: {got!r} != {completion!r}")
    log(f"[{label}] {len(convs) - bad}/{len(convs)} completions exact")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (same build + same threads = same file)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    convs = conversations()
    full, full_vocab = full_tokenizer()
    vocab = sub_vocabulary([p + c for p, c in convs], full, full_vocab)
    tok = Tokenizer.from_vocab(vocab.tokens, vocab.merges, vocab.token_types)
    for p, c in convs:  # the sub-vocabulary must split every text exactly as the real tokenizer does
        for text in (p, c):
            assert [full.tokens[i] for i in full.encode(text)] == [tok.tokens[i] for i in tok.encode(text)], text
    print(f"{len(convs)} conversations, sub-vocabulary {len(vocab.tokens)} tokens, {len(vocab.merges)} merges")

    examples = [(tok.encode(p), tok.encode(c)) for p, c in convs]
    model = build_model(len(vocab.tokens), args.seed)
    print(f"{sum(p.numel() for p in model.parameters())} parameters")
    train(model, examples, args.steps)
    if check(model, tok, convs, "trained"):
        print("warning: not every completion is exact")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    mt.write_ds4_gguf(model, args.out, types=None, tokenizer=vocab,
                      name="spark-setup demo (tiny DS4 pipeline fixture, not a language model)")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    exported = mt.hf_from_gguf(args.out, dtype=torch.float32)
    bad = check(exported, Tokenizer.from_gguf(args.out), convs, "gguf")
    import hashlib

    (args.out.parent / "ds4-demo.json").write_text(json.dumps({
        "conversations": len(convs), "vocab": len(vocab.tokens), "steps": args.steps, "seed": args.seed,
        "threads": args.threads, "torch": torch.__version__, "exact_after_export": len(convs) - bad,
        "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest()}, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
