"""Train (and evaluate) the bundled default model: a tiny Llama on the ``arith`` benchmark.

Train::

    OMP_NUM_THREADS=1 python -m ttscale.evals.train_arith --out evals/model

Evaluate a saved model on the held-out ``arith`` test split (``n`` samples per problem at
temperature 1, top-p 1; pass@1, unbiased pass@k and majority@k over the ``n`` samples)::

    OMP_NUM_THREADS=1 python -m ttscale.evals.train_arith --eval evals/model --n 64

The tokenizer is a small byte-level BPE trained on arith text with digits always split
(:func:`build_tokenizer`), with ``<bos>`` prepended by the post-processor and ``<eos>`` ending
every worked solution. The loss covers the solution and ``<eos>`` only, not the
question. Everything is deterministic given ``--seed`` on one thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttscale.evals.arith import (
    DEFAULT_TRAIN_SEED,
    check,
    extract_arith_answer,
    generate_items,
)

__all__ = ["build_tokenizer", "evaluate", "main", "pass_at_k", "train"]

logger = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def build_tokenizer(texts: Sequence[str], vocab_size: int = 512) -> Any:
    """A small byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``.

    Digits are always single tokens (``Digits(individual_digits=True)`` before the GPT-2 byte
    level split), so numbers are spelled digit by digit while the words of the arith language
    become one token each. ``<bos>`` is prepended by the post-processor. Training is
    deterministic: the same texts give the same ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k, ``1 - C(n-c, k) / C(n, k)``, as the stable product (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_correct(answers: Sequence[str | None], reference: str) -> float:
    """Plurality vote over parsed answers; ties credited as the expected value of a random pick."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [a for a, c in counts.items() if c == top]
    return sum(check(a, reference) for a in tied) / len(tied)


def _set_threads(threads: int) -> None:
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)


def _encode(tokenizer: Any, prompt: str, solution: str) -> tuple[list[int], list[int]]:
    """Token ids of ``<bos> prompt solution <eos>`` and labels (``-100`` on the prompt)."""
    p = tokenizer(prompt)["input_ids"]
    s = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + s, [-100] * len(p) + s


def train(
    out: str | Path,
    *,
    seed: int = DEFAULT_TRAIN_SEED,
    steps: int = 4000,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 100,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    intermediate: int = 384,
    train_size: int = 50_000,
    vocab_size: int = 512,
    weights: Sequence[float] | None = None,
    save_every: int = 0,
    log_every: int = 50,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train a Llama from scratch on ``train_size`` arith train problems; save to ``out``.

    AdamW (betas 0.9/0.98, weight decay 0.01), linear warm-up then cosine decay to 10% of
    ``lr`` over ``steps`` steps; ``stop_after`` ends training early on that schedule (the
    bundled model is deliberately under-trained this way). Batches: length-grouped draws with
    replacement from a seeded torch generator. Returns a summary (parameters, wall time, final
    loss). With ``save_every > 0`` intermediate models go to ``out/checkpoints/step-<k>``.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    out = Path(out)
    items = generate_items(train_size, split="train", seed=seed, weights=weights)
    tokenizer = build_tokenizer([it.prompt + it.solution for it in items[:5000]], vocab_size)
    encoded = [_encode(tokenizer, it.prompt, it.solution) for it in items]
    max_len = max(len(ids) for ids, _ in encoded)

    head_dim = hidden // heads
    config = LlamaConfig(  # type: ignore[call-arg]  # transformers' stubs omit rope_theta/torch_dtype
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "model: %d parameters, %d training problems, max length %d", n_params, len(items), max_len
    )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    ema: float | None = None
    history: list[dict[str, float]] = []
    lengths = torch.tensor([len(ids) for ids, _ in encoded])
    queue: list[list[int]] = []
    last = steps if stop_after is None else min(steps, stop_after)
    for step in range(last):
        if not queue:
            # Length-grouped batches cut padding: draw 16 batches' worth of problems, sort them by
            # length, cut into batches and visit those in random order.
            pool = torch.randint(len(encoded), (16 * batch_size,), generator=gen)
            pool = pool[torch.argsort(lengths[pool], stable=True)].view(16, batch_size)
            queue = [pool[j].tolist() for j in torch.randperm(16, generator=gen).tolist()]
        batch = [encoded[i] for i in queue.pop()]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for r, (ids, lab) in enumerate(batch):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if (step + 1) % log_every == 0 or step + 1 == last:
            elapsed = time.perf_counter() - t0
            history.append({"step": step + 1, "loss_ema": ema, "elapsed_s": elapsed})
            logger.info(
                "step %d/%d loss %.4f (ema %.4f) lr %.2e %.0fs",
                step + 1,
                steps,
                value,
                ema,
                lr_at(step),
                elapsed,
            )
        if save_every and (step + 1) % save_every == 0 and step + 1 < last:
            _save(model, tokenizer, out / "checkpoints" / f"step-{step + 1}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    _save(model, tokenizer, out)
    gen_cfg = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128,
    )
    gen_cfg.save_pretrained(out)
    summary = {
        "parameters": n_params,
        "steps": steps,
        "stopped_after": last,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_size": train_size,
        "vocab_size": len(tokenizer),
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "threads": torch.get_num_threads(),
        "final_loss_ema": ema,
        "history": history,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _save(model: Any, tokenizer: Any, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # Name the portable class (transformers 5 writes its own backend name, older versions and
    # vLLM's tokenizer loaders know PreTrainedTokenizerFast).
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def evaluate(
    model_path: str | Path,
    *,
    n: int = 64,
    ks: Sequence[int] = (1, 8, 64),
    seed: int = 0,
    limit: int | None = None,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    batch_problems: int = 4,
) -> dict[str, Any]:
    """Sample ``n`` completions per arith test problem with HF transformers; report metrics.

    Returns ``pass@k`` (unbiased, mean over problems) for each ``k <= n``, ``maj@n`` (plurality
    vote over all ``n`` parsed answers) and the same broken down by difficulty level.
    ``batch_problems`` prompts (left-padded) are sampled per ``generate`` call, seeded with
    ``seed + batch index``.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from ttscale.evals.registry import load_problems

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    problems = load_problems("arith", "test", limit=limit)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, len(problems), batch_problems)):
        chunk = problems[start : start + batch_problems]
        torch.manual_seed(seed + b)
        enc = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(  # type: ignore[misc]
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                num_return_sequences=n,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for j, prob in enumerate(chunk):
            mine = texts[j * n : (j + 1) * n]  # generate() keeps each prompt's n samples together
            answers = [extract_arith_answer(t) for t in mine]
            rows.append(
                {
                    "id": prob.id,
                    "difficulty": prob.meta["difficulty"],
                    "correct": sum(check(a, prob.reference) for a in answers),
                    "maj": majority_correct(answers, str(prob.reference)),
                    "answers": answers,
                    "example": mine[0],
                }
            )
        logger.info(
            "evaluated %d/%d problems (%.0fs)", len(rows), len(problems), time.perf_counter() - t0
        )

    def summarise(rs: list[dict[str, Any]]) -> dict[str, float]:
        res = {
            f"pass@{k}": sum(pass_at_k(n, r["correct"], k) for r in rs) / len(rs)
            for k in ks
            if k <= n
        }
        res[f"maj@{n}"] = sum(r["maj"] for r in rs) / len(rs)
        res["problems"] = len(rs)
        return res

    levels = sorted({r["difficulty"] for r in rows})
    report = {
        "model": str(model_path),
        "n": n,
        "temperature": temperature,
        "seed": seed,
        "overall": summarise(rows),
        "by_difficulty": {
            str(d): summarise([r for r in rows if r["difficulty"] == d]) for d in levels
        },
        "eval_time_s": round(time.perf_counter() - t0, 1),
        "per_problem": rows,
    }
    return report


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ttscale.evals.train_arith", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out", default="evals/model", help="output directory of the trained model")
    ap.add_argument(
        "--eval", metavar="MODEL", help="evaluate MODEL on the arith test split instead of training"
    )
    ap.add_argument("--seed", type=int, default=DEFAULT_TRAIN_SEED)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--train-size", type=int, default=50_000)
    ap.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (at most)")
    ap.add_argument("--weights", default=None, help="difficulty mix, e.g. 1,1,1,1,1 (levels 1..5)")
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many steps of the schedule"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=64, help="samples per problem in --eval")
    ap.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first LIMIT problems"
    )
    ap.add_argument("--batch-problems", type=int, default=4, help="prompts per generate call")
    ap.add_argument("--report", default=None, help="write the --eval report (JSON) here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    _set_threads(args.threads)
    if args.eval:
        report = evaluate(
            args.eval,
            n=args.n,
            seed=args.seed,
            limit=args.limit,
            batch_problems=args.batch_problems,
        )
        text = json.dumps({k: v for k, v in report.items() if k != "per_problem"}, indent=1)
        logger.info("%s", text)
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
        return
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    summary = train(
        args.out,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
        train_size=args.train_size,
        vocab_size=args.vocab_size,
        weights=weights,
        save_every=args.save_every,
        log_every=args.log_every,
        stop_after=args.stop_after,
    )
    logger.info("trained: %s", json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
