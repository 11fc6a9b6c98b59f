"""Export a recipe's final checkpoint as a model directory with a model card (README.md).

The directory holds exactly what a user needs: config.json + model.safetensors (official names, via
mimo.checkpoint.save_model at training time), tokenizer.json / tokenizer_config.json (chat template) /
special_tokens_map.json, README.md. Before writing, the export checks that `mimo.checkpoint.load_model` and
`transformers.AutoModelForCausalLM` give the same logits and that `AutoTokenizer` loads the tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt_io
from .config import TrainConfig
from .loop import read_metrics

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json")


def check_loads(model_dir: str | Path) -> dict[str, Any]:
    """Logits of mimo vs transformers on a chat prompt followed by code, longer than the sliding window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mimo.checkpoint import load_model
    from mimo.data import Tokenizer

    ours = load_model(model_dir, dtype=torch.float32).eval()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": "sort 5 3 9 1"}]
    ids = tok.encode_chat(msgs, add_generation_prompt=True)
    hf_ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if not isinstance(hf_ids, list):
        hf_ids = hf_ids["input_ids"]
    text = Path(json.__file__).read_text()[:2000]
    x = torch.tensor([ids + tok.encode(text)[: 3 * ours.config.sliding_window]])
    with torch.no_grad():
        diff = float((ours(x) - hf(x).logits).abs().max())
    return {"tokens": x.shape[1], "max_abs_logit_diff": diff, "chat_ids_equal": list(hf_ids) == ids}


def _last(rows: list[dict], key: str):
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else None


def _first(rows: list[dict], key: str):
    vals = [r[key] for r in rows if key in r]
    return vals[0] if vals else None


def stage_summary(cfg: TrainConfig) -> dict[str, Any]:
    rows = read_metrics(cfg.out)
    train = [r for r in rows if "loss" in r]
    times = [r["time"] for r in train if "time" in r]
    return {
        "steps": cfg.steps, "batch": f"{cfg.batch_size} x {cfg.seq_len}", "lr": f"{cfg.lr:g} -> {cfg.min_lr:g}",
        "tokens": sum(r.get("tokens", 0) for r in train),
        "tok_per_s": _last(train, "tok_per_s"),
        "wall_s": round(times[-1] - times[0], 1) if len(times) > 1 else None,
        "first_lm_loss": _first(train, "lm_loss"),
        # one batch is noisy (task-heavy batches have much lower loss than code-heavy ones): last 10 steps
        "last_lm_loss": (sum(r["lm_loss"] for r in train[-10:]) / len(train[-10:])) if train else None,
        "val_loss": _last(rows, "val_loss"), "val_acc": _last(rows, "val_acc"),
        "val_mtp_acc": _last(rows, "val_mtp_acc"), "val_mtp_loss": _last(rows, "val_mtp_loss"),
        "load_max_mean": _last(train, "load_max_mean"),
    }


def _fmt(x, nd=3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, list):
        return ", ".join(_fmt(v, nd) for v in x)
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def model_card(recipe: str, stages: dict[str, TrainConfig], final: Path, acc: dict[str, float],
               eval_n: int, wall: dict[str, float], loads: dict[str, Any]) -> str:
    from mimo.model import ModelConfig

    mc = ModelConfig.from_pretrained(final)
    from mimo.checkpoint import load_model

    model = load_model(final, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    n_mtp = sum(p.numel() for n, p in model.named_parameters() if ".mtp." in n)
    E, K = mc.n_experts, mc.n_active_experts
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - n_mtp - expert + expert * K // E
    corpus = json.loads((final / ckpt_io.CORPUS_FILE).read_text()) if (final / ckpt_io.CORPUS_FILE).is_file() \
        else {}
    s = {name: stage_summary(cfg) for name, cfg in stages.items()}
    pre, mtp_cfg, sft_cfg = stages["pretrain"], stages["mtp"], stages["sft"]
    total_wall = sum(v for v in wall.values() if v)
    pattern = "".join("G" if t == "full" else "S" for t in mc.layer_types)
    mlp = "".join("D" if t == "dense" else "M" for t in mc.mlp_types)
    lines = [
        f"# mimo-{recipe}",
        "",
        f"The default model shipped with `mimo`: the MiMo-V2-Flash architecture at {n_params / 1e6:.1f}M "
        f"parameters ({active / 1e6:.1f}M active per token without the MTP heads), trained from scratch on a "
        "CPU in about an hour on Python standard-library code mixed with three chat-formatted toy tasks "
        "(`add`, `reverse`, `sort`). It is a test fixture and a demo for the engine (MTP speculative decoding "
        "on code prompts), not a useful assistant.",
        "",
        "## Architecture",
        "",
        "| field | value |",
        "|---|---|",
        f"| layers | {mc.n_layers}: attention `{pattern}` (G global, S sliding window {mc.sliding_window} "
        f"incl. the current token, with sink logits), FFN `{mlp}` (D dense, M MoE) |",
        f"| hidden size | {mc.dim}; vocabulary {mc.vocab_size} (byte-level BPE) |",
        f"| attention | global {mc.n_heads} q / {mc.n_kv_heads} kv heads, sliding {mc.swa_n_heads} q / "
        f"{mc.swa_n_kv_heads} kv heads; q/k head dim {mc.head_dim}, v head dim {mc.v_head_dim}; partial RoPE "
        f"({mc.partial_rotary_factor} of the q/k dim; theta {mc.rope_theta:g} global, {mc.swa_rope_theta:g} "
        f"sliding); value scale {mc.attention_value_scale} |",
        f"| MoE | {E} routed experts, top-{K}, sigmoid router with selection bias (aux-loss-free balancing), "
        f"expert size {mc.moe_intermediate_size}; dense FFN {mc.intermediate_size} |",
        f"| MTP | {model.n_mtp} heads (sliding-window block + dense FFN each, sharing embedding and lm_head), "
        "non-chain: each gets the main model's pre-norm hidden state |",
        f"| parameters | {n_params:,} total, of which MTP heads {n_mtp:,}; weights float32 |",
        "",
        "## Training",
        "",
        f"Recipe `{recipe}` (`mimo.train.recipes.{recipe}`), three stages, one CPU process each, 1 thread "
        "(`OMP_NUM_THREADS=1`), on a 2-core machine shared with other jobs:",
        "",
        "| stage | steps | batch (seqs x tokens) | LR | tokens | wall time | train lm loss (last 10 steps) | "
        "final val loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in stages:
        v = s[name]
        w = wall.get(name) or v["wall_s"]
        lines.append(f"| {name} | {v['steps']} | {v['batch']} | {v['lr']} | {v['tokens']:,} | "
                     f"{_fmt(w / 60 if w else None, 1)} min | {_fmt(v['last_lm_loss'])} | {_fmt(v['val_loss'])} |")
    lines += [
        "",
        f"Total wall time: {total_wall / 60:.1f} min (stages + task evaluation)." if total_wall else "",
        "",
        f"- **pretrain**: code + chat-rendered task examples ({pre.task_fraction:.0%} of characters), packed "
        f"into {pre.seq_len}-token rows; ONE MTP head trained with the main model, loss weight "
        f"{' then '.join(f'{w:g} (from {a:.0%} of the steps)' for a, w in pre.mtp_weights)}; AdamW "
        f"{pre.betas}, weight decay {pre.weight_decay:g} on matrices, clip {pre.grad_clip:g}, "
        f"{pre.warmup_steps} warmup steps then cosine; aux-loss-free expert balancing (router bias += "
        f"{pre.bias_update_rate:g} * sign(mean load - load) after each step) plus a sequence-level balance loss "
        f"(coefficient {pre.aux_loss_coef:g}).",
        f"- **mtp**: head 0 copied to {mtp_cfg.n_mtp_heads} heads (`copy_mtp_heads`), trained jointly on the "
        "same mixture" + (" with the trunk, embedding and lm_head frozen." if mtp_cfg.freeze_trunk else "."),
        f"- **sft**: task conversations (train split), loss only on assistant tokens (answer + `<|im_end|>`), "
        f"MTP loss kept on with the same mask (weight {sft_cfg.mtp_weights[0][1]:g}), plus one packed code "
        f"micro-batch of {sft_cfg.sft_code_rows} x {sft_cfg.seq_len} tokens per step at "
        f"{sft_cfg.code_fraction:.0%} of the objective; LR {sft_cfg.lr:g} -> {sft_cfg.min_lr:g}.",
        "",
        "Corpus: "
        + (f"Python {corpus.get('python_version')} standard library (tests excluded), "
           f"{corpus.get('n_files_train')} train / {corpus.get('n_files_val')} validation files, "
           f"{corpus.get('bytes_train', 0) / 1e6:.1f} MB / {corpus.get('bytes_val', 0) / 1e6:.2f} MB, "
           f"sha256 `{corpus.get('sha256')}`; split rule `{corpus.get('split_rule')}`." if corpus else "n/a"),
        "",
        "### Exact commands",
        "",
        "```bash",
        "export OMP_NUM_THREADS=1",
        f"mimo pretrain --recipe {recipe} --out runs/{recipe}/pretrain --threads 1",
        f"mimo pretrain --recipe {recipe} --stage mtp --out runs/{recipe}/mtp --threads 1",
        f"mimo sft --recipe {recipe} --out runs/{recipe}/sft --threads 1",
        f"python -m mimo.train.cli export --recipe {recipe} --runs runs/{recipe} --out models/mimo-{recipe}",
        f"mimo eval --model models/mimo-{recipe} --tasks add,reverse,sort",
        "```",
        "",
        "(`python -m mimo.train.cli pretrain|sft|eval ...` is the same without the `mimo` console script. An "
        f"interrupted stage continues exactly with `--resume runs/{recipe}/STAGE`.)",
        "",
        "## Results",
        "",
        f"Task accuracy (exact match, greedy, chat template, {eval_n} held-out prompts per task):",
        "",
        "| task | accuracy |",
        "|---|---|",
    ]
    lines += [f"| {t} | {a:.2f} |" for t, a in acc.items()]
    mtp, sft = s.get("mtp", {}), s.get("sft", {})
    lines += [
        "",
        "Validation (after each stage):",
        "",
        f"- pretrain: loss {_fmt(s['pretrain']['val_loss'])} nats/token, top-1 accuracy "
        f"{_fmt(s['pretrain']['val_acc'])} (held-out code files + held-out task examples); MTP head 0 top-1 "
        f"accuracy {_fmt(s['pretrain']['val_mtp_acc'])}.",
        f"- mtp stage: MTP heads 0/1/2 top-1 accuracy {_fmt(mtp.get('val_mtp_acc'))} (predicting tokens "
        "t+2, t+3, t+4) on the same validation data.",
        f"- sft: loss {_fmt(sft.get('val_loss'))} on held-out conversations' assistant tokens, top-1 "
        f"{_fmt(sft.get('val_acc'))}; MTP heads 0/1/2 top-1 {_fmt(sft.get('val_mtp_acc'))}.",
        f"- expert load balance at the end of pretraining (max / mean tokens per expert, per MoE layer; 1.0 is "
        f"perfect, {E / K:.0f} is everything on {K} experts): "
        f"{', '.join(f'L{k} {v:.2f}' for k, v in (loads or {}).items()) or 'n/a'}.",
        "",
        "Training curves: `curves.png` in each stage's run directory (not shipped).",
        "",
        "## Use",
        "",
        "```python",
        "from mimo.checkpoint import load_model",
        "from mimo.data import Tokenizer",
        "from mimo.model import generate",
        f"model, tok = load_model('models/mimo-{recipe}'), Tokenizer.from_pretrained('models/mimo-{recipe}')",
        "ids = tok.encode_chat([{'role': 'user', 'content': 'reverse hello'}], add_generation_prompt=True)",
        "print(tok.decode(generate(model, ids, 16, eos_token_id=tok.eos_id), skip_special_tokens=True))",
        "```",
        "",
        "transformers (>= 5.24) loads the same directory with `AutoModelForCausalLM.from_pretrained` (same "
        "logits; it drops the MTP heads) and `AutoTokenizer.from_pretrained` (same chat template).",
        "",
        "## Limitations",
        "",
        "Tiny, briefly trained: code completions are locally plausible at best; task accuracy is far from "
        "perfect (addition with carries is the hardest). Trained on fp32 CPU; no safety tuning of any kind.",
        "",
    ]
    return "\n".join(lines)


def export_model(recipe: str, stages: dict[str, TrainConfig], final: Path, dest: str | Path,
                 acc: dict[str, float], wall: dict[str, float], eval_n: int) -> Path:
    final = Path(final)
    dest = Path(dest)
    check = check_loads(final)
    if check["max_abs_logit_diff"] > 1e-3 or not check["chat_ids_equal"]:
        raise RuntimeError(f"export check failed: {check}")
    loads = stage_summary(stages["pretrain"])["load_max_mean"]
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in MODEL_FILES:
        shutil.copyfile(final / f, tmp / f)
        os.chmod(tmp / f, 0o644)
    card = model_card(recipe, stages, final, acc, eval_n, wall, loads)
    card += (f"\nExport check: mimo vs transformers max |logit diff| {check['max_abs_logit_diff']:.2e} over "
             f"{check['tokens']} tokens; chat template ids identical: {check['chat_ids_equal']}.\n")
    (tmp / "README.md").write_text(card)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, dest)
    return dest
