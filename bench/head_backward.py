"""LM-head backward: exact dense dH = G @ W_head vs the vocab-sparse top-k backward.

    python bench/head_backward.py                      # CPU, scaled token counts
    python bench/head_backward.py --device cuda --dtype bf16 --tokens 4096

For each vocabulary shape (SmolLM2 49K×576, LLaMA-3.2-1B 128K×2048, Gemma 256K×2304)
and head_keep, times the dense product and the full sparse backward step (score the
columns of G, top-k, gathered GEMM), interleaved in one run, median of repeats, and
prints the speed-up next to its FLOP ceiling V / k (the score pass is O(T·V), 1/d of
the dense product, and is counted in the measured time, not in the ceiling). Also the
relative error of the approximation on a synthetic softmax − one-hot gradient, and the
same backward with the tail correction (``corr_*``: the cost of the correction and its error;
celora_dist/head.py). The synthetic W is isotropic, so its errors understate a real
embedding's: see --diagnose.

    python bench/head_backward.py --diagnose           # SmolLM2-135M on PIQA answers, < 1 min on 2 cores
    python bench/head_backward.py --diagnose --grad    # + the LoRA gradient's error (3 backwards per batch)
    python bench/head_backward.py --diagnose --steps 4 # after 4 Adam steps of LoRA on batch 0

--diagnose measures, on real logit gradients (loss on the answer tokens only, as --mc-format text
trains), what the dropped rows' error looks like: the head's anisotropy ‖mean row‖ / mean ‖row‖,
the relative dH error without / with a uniform tail mean / with the gradient-weighted tail mean
(the library's correction), the cosine of each token's error with −(mean dropped row), the mean
pairwise cosine of different tokens' errors (0 for independent noise), the share of labels the
plain top-k keeps, and the error on the tokens the model already predicts (p_label > 0.5: what
later training looks like). --grad adds the relative error of the LoRA gradient of all seven
projections (what the update sees) and the cosine between two batches' gradient errors.
"""
from __future__ import annotations

import argparse

import torch
from _common import interleaved_medians, machine_line, markdown_table

from celora_dist.config import num_kept  # noqa: E402
from celora_dist.head import TailMean, column_statistics, select_rows, sparse_grad_input  # noqa: E402
from celora_dist.kernels import grad_input  # noqa: E402
from celora_dist.ops.amm import gradient_scores  # noqa: E402
from celora_dist.selection import topk_indices  # noqa: E402

SHAPES = {"smollm2-135m": (49152, 576), "llama-3.2-1b": (128256, 2048), "gemma-2b": (256000, 2304)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def logit_gradient(tokens: int, vocab: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """softmax − one-hot of Zipf-ish logits: the heavy-tailed shape of a real LM's G.

    Drawn on ``device``: at T = 4096 the Gemma head's logits are 1e9 fp32 numbers (4 GB),
    which a CPU generator would make and copy over for every shape of the CUDA run."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank_bias = -1.1 * torch.log1p(torch.arange(vocab, dtype=torch.float32, device=device))
    logits = rank_bias[torch.randperm(vocab, generator=g, device=device)]
    logits = logits + 2.0 * torch.randn(tokens, vocab, generator=g, device=device)
    G = torch.softmax(logits, dim=-1)
    del logits
    G[torch.arange(tokens, device=device),
      torch.randint(0, vocab // 20, (tokens,), generator=g, device=device)] -= 1.0
    return (G / tokens).to(dtype)


def sparse_backward(G: torch.Tensor, W: torch.Tensor, w_row_sq: torch.Tensor, k: int) -> torch.Tensor:
    return grad_input(G, W, topk_indices(gradient_scores(G) * w_row_sq, k))


def corrected_backward(G: torch.Tensor, W: torch.Tensor, w_row_sq: torch.Tensor, k: int) -> torch.Tensor:
    """The head's backward with the tail correction, as celora_dist/head.py runs it."""
    scores, colsum, labels = column_statistics(G, True)
    selected = select_rows(scores, w_row_sq, k, labels)
    return sparse_grad_input(G, W, selected, TailMean(colsum, W, selected, G.dtype))


def run(shapes: list[str], keeps: list[float], tokens: int, dtype: str, device: str, repeats: int) -> list[dict]:
    """All rows; each shape's rows are printed (after the header) as soon as it is measured,
    so a run cut off by a time limit keeps the shapes it finished."""
    rows = []
    dt = DTYPES[dtype]
    print(markdown_table([], COLUMNS, FORMATS), flush=True)
    for shape in shapes:
        vocab, hidden = SHAPES[shape]
        g = torch.Generator(device=device).manual_seed(1)
        W = (torch.randn(vocab, hidden, generator=g, device=device) * hidden ** -0.5).to(dt)
        w_row_sq = W.float().pow(2).sum(1)
        G = logit_gradient(tokens, vocab, dt, device)
        exact = (G.float() @ W.float())
        cases = {"dense": lambda: G @ W}
        for keep in keeps:
            k = num_kept(keep, vocab)
            cases[keep] = (lambda k=k: sparse_backward(G, W, w_row_sq, k))
            cases[("corr", keep)] = (lambda k=k: corrected_backward(G, W, w_row_sq, k))
        med = interleaved_medians(cases, repeats, device)
        dense = med["dense"]
        shape_rows = []
        for keep in keeps:
            k = num_kept(keep, vocab)
            approx = sparse_backward(G, W, w_row_sq, k).float()
            corrected = corrected_backward(G, W, w_row_sq, k).float()
            t = med[keep]
            ceiling = vocab / k
            shape_rows.append({
                "shape": shape, "V": vocab, "d": hidden, "T": tokens, "keep": keep, "k": k,
                "dense_ms": 1e3 * dense, "sparse_ms": 1e3 * t, "speedup": dense / t,
                "ceiling": ceiling, "of_ceiling": (dense / t) / ceiling,
                "rel_err": float((approx - exact).norm() / exact.norm()),
                "corr_ms": 1e3 * med[("corr", keep)],
                "corr_rel_err": float((corrected - exact).norm() / exact.norm()),
            })
        print("\n".join(markdown_table(shape_rows, COLUMNS, FORMATS).splitlines()[2:]), flush=True)
        rows += shape_rows
        del G, W, w_row_sq, exact, cases  # the next shape's G and W (up to 6 GB) need the room
    return rows


COLUMNS = ["shape", "V", "d", "T", "keep", "k", "dense_ms", "sparse_ms", "speedup", "ceiling", "of_ceiling", "rel_err",
           "corr_ms", "corr_rel_err"]


FORMATS = {"keep": "{:.2f}", "dense_ms": "{:.1f}", "sparse_ms": "{:.1f}", "speedup": "{:.2f}x",
           "ceiling": "{:.1f}x", "of_ceiling": "{:.0%}", "rel_err": "{:.3f}", "corr_ms": "{:.1f}",
           "corr_rel_err": "{:.3f}"}


# ---- --diagnose: the error's structure on a real model's logit gradients -------------------------

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _smoke_model():
    """A tiny tied Llama whose embedding rows share a common mean, as real ones do."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    with torch.no_grad():
        w = model.model.embed_tokens.weight
        w.add_(0.05 * torch.randn(1, w.shape[1]))
    return model, None


def _smoke_batches(n_batches: int, batch: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, 512, (batch, 24), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -6:] = ids[:, -6:]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _piqa_batches(tokenizer, n_batches: int, batch: int) -> list[dict]:
    """Micro-batches of PIQA training records as the trainer builds them (--mc-format text, seq 256)."""
    from celora_dist.train.data import collate, example_ids
    from celora_dist.train.embedded import task_records
    train, _, _ = task_records("text")
    out = []
    for b in range(n_batches):
        recs = train[b * batch:(b + 1) * batch]
        rows = [dict(zip(("input_ids", "labels"), example_ids(tokenizer, r, 256))) for r in recs]
        out.append(collate(rows, tokenizer.pad_token_id or 0))
    return out


def _counted(model, b: dict, grad: bool):
    """(final hidden states, flat positions of the counted tokens, their labels) of one micro-batch."""
    with torch.set_grad_enabled(grad):
        h = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    labels = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
    where = (labels != -100).nonzero().squeeze(1)
    return h, where, labels[where]


def dh_variants(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, keep: float) -> dict:
    """The exact dH and its approximations for counted hidden states ``x`` (fp32), with their statistics."""
    V = W.shape[0]
    k = num_kept(keep, V)
    p = torch.softmax(x @ W.t(), dim=-1)
    p_label = p[torch.arange(len(y)), y]
    G = p
    G[torch.arange(len(y)), y] -= 1.0
    G /= len(y)
    exact = G @ W
    w_row_sq = W.pow(2).sum(1)
    plain_sel = topk_indices(gradient_scores(G) * w_row_sq, k)
    kept = torch.zeros(V, dtype=torch.bool)
    kept[plain_sel] = True
    mu_tail = W[~kept].mean(0)
    plain = G[:, plain_sel] @ W[plain_sel]
    uniform = plain + (G[:, ~kept].sum(1))[:, None] * mu_tail[None]
    weighted = corrected_backward(G, W, w_row_sq, k)
    return {"exact": exact, "none": plain, "uniform": uniform, "weighted": weighted, "p_label": p_label,
            "labels_kept": float(kept[y].float().mean()), "mu_tail": mu_tail}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _pairwise_cos(E: torch.Tensor) -> float:
    """Mean cosine between the error vectors of different tokens (0 for independent noise)."""
    n = E.shape[0]
    En = E / E.norm(dim=1, keepdim=True).clamp_min(1e-30)
    C = En @ En.t()
    return float((C.sum() - C.diagonal().sum()) / (n * (n - 1)))


def _train_steps(model, lora, b: dict, steps: int, lr: float) -> None:
    """``steps`` Adam steps of LoRA with the exact head on micro-batch ``b``: a cheap stand-in for
    "later in training" (the model then predicts that batch's answers far better)."""
    opt = torch.optim.Adam(lora, lr=lr)
    for i in range(steps):
        h, where, y = _counted(model, b, True)
        loss = torch.nn.functional.cross_entropy(model.lm_head(h.reshape(-1, h.shape[-1])[where]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"# train step {i}: loss {loss.item():.3f}", flush=True)


def diagnose(n_batches: int, batch: int, keeps: list[float], grad: bool, smoke: bool, steps: int = 0,
             lr: float = 2e-3) -> list[dict]:
    from celora_dist import CELoRAConfig, inject_celora
    if smoke:
        model, tokenizer = _smoke_model()
        batches = _smoke_batches(n_batches, batch)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from celora_dist.train.embedded import ensure_model
        path = ensure_model()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        batches = _piqa_batches(tokenizer, n_batches, batch)
    inject_celora(model, CELoRAConfig(keep={}, exact=SEVEN), verbose=False)  # plain LoRA on the seven
    lora = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # LoRA's B starts at 0 (dA = 0): a small B, so every adapter has a gradient
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 1e-3)
    W = model.lm_head.weight.detach().float()
    mean_row = W.mean(0)
    print(f"# head {tuple(W.shape)}, tied={model.config.tie_word_embeddings}: ||mean row|| / mean ||row|| = "
          f"{float(mean_row.norm() / W.norm(dim=1).mean()):.3f}", flush=True)
    rows = _measure(model, lora, batches, W, keeps, grad, "start")
    if steps:
        _train_steps(model, lora, batches[0], steps, lr)
        rows += _measure(model, lora, batches, W, keeps, grad, f"after {steps} steps on batch 0")
    return rows


class _LayerContrast:
    """A projection's dX error at the released keep 0.55 (``G[:, Ī] Ws[Ī]``, the error CE-LoRA's layer
    makes, Ws = W0 − B0 A0 at r0 = 14), from the G an exact backward delivers at the layer's output."""

    def __init__(self, model, keep: float = 0.55, r0: int = 14) -> None:
        from celora_dist.factors import double_lora_factors
        layers = model.model.layers
        self.name = f"layers.{len(layers) // 2}.mlp.down_proj"
        self.layer = layers[len(layers) // 2].mlp.down_proj
        w0 = self.layer.base_layer.weight.detach().float()
        B0, A0, self.ws_row_sq = double_lora_factors(w0, r0, torch.float32)
        self.w0, self.ws, self.k = w0, w0 - B0 @ A0, num_kept(keep, w0.shape[0])
        self.G = None
        self.layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, out):
        if out.requires_grad:
            out.register_hook(lambda g: setattr(self, "G", g.detach().reshape(-1, g.shape[-1]).clone()))

    def error(self) -> tuple[torch.Tensor, float]:
        """(per-token error rows of the tokens that carry gradient, relative error) for the last G."""
        G = self.G
        kept = topk_indices(gradient_scores(G) * self.ws_row_sq, self.k)
        dropped = torch.ones(G.shape[1], dtype=torch.bool)
        dropped[kept] = False
        E = G[:, dropped] @ self.ws[dropped]
        live = G.abs().sum(1) > 0
        return E[live], _rel(E + G @ self.w0, G @ self.w0)


def _measure(model, lora, batches: list[dict], W: torch.Tensor, keeps: list[float], grad: bool,
             phase: str) -> list[dict]:
    rows = []
    grads: dict = {}
    layer_errors: dict = {}
    contrast = getattr(model, "_head_diag_contrast", None)
    if grad and contrast is None:
        contrast = model._head_diag_contrast = _LayerContrast(model)
    for bi, b in enumerate(batches):
        h, where, y = _counted(model, b, grad)
        x = h.reshape(-1, h.shape[-1])[where]
        for keep in keeps:
            with torch.no_grad():
                v = dh_variants(x.detach().float(), y, W, keep)
            E = v["none"] - v["exact"]
            easy = v["p_label"] > 0.5
            cos_mu = torch.nn.functional.cosine_similarity(E, -v["mu_tail"][None], dim=1)
            row = {"phase": phase, "batch": bi, "p_label": float(v["p_label"].median()), "keep": keep,
                   "tokens": len(y), "labels_kept": v["labels_kept"],
                   "rel_none": _rel(v["none"], v["exact"]), "rel_uniform": _rel(v["uniform"], v["exact"]),
                   "rel_weighted": _rel(v["weighted"], v["exact"]), "cos_mu": float(cos_mu.mean()),
                   "pair_none": _pairwise_cos(E), "pair_weighted": _pairwise_cos(v["weighted"] - v["exact"]),
                   "easy": int(easy.sum()),
                   "rel_easy_none": _rel(v["none"][easy], v["exact"][easy]) if easy.any() else float("nan"),
                   "rel_easy_weighted": _rel(v["weighted"][easy], v["exact"][easy]) if easy.any() else float("nan"),
                   "grad_none": float("nan"), "grad_weighted": float("nan")}
            if grad and keep == keeps[len(keeps) // 2]:
                g = {}
                for name in ("exact", "none", "weighted"):
                    model.zero_grad(set_to_none=True)
                    full = torch.zeros_like(h).reshape(-1, h.shape[-1])
                    full[where] = v[name]
                    h.backward(full.view_as(h), retain_graph=name != "weighted")
                    g[name] = torch.cat([p.grad.flatten() for p in lora])
                    if name == "exact":
                        layer_errors[bi], rel = contrast.error()
                        print(f"# {contrast.name} at keep 0.55, batch {bi}: dX rel error {rel:.3f}, pairwise cos "
                              f"of tokens' errors {_pairwise_cos(layer_errors[bi]):.3f}", flush=True)
                row["grad_none"], row["grad_weighted"] = _rel(g["none"], g["exact"]), _rel(g["weighted"], g["exact"])
                grads[bi] = g
            rows.append(row)
            first = len(rows) == 1 and phase == "start"  # the header once, then rows as measured
            print("\n".join(markdown_table([row], DIAG_COLUMNS, DIAG_FORMATS).splitlines()[0 if first else 2:]),
                  flush=True)
    if len(grads) >= 2:
        cos = torch.nn.functional.cosine_similarity
        a, c = grads[0], grads[1]
        print(f"# LoRA gradient, batch 0 vs 1: cos(true) {float(cos(a['exact'], c['exact'], dim=0)):.3f}; "
              f"cos(errors) none {float(cos(a['none'] - a['exact'], c['none'] - c['exact'], dim=0)):.3f}, "
              f"weighted {float(cos(a['weighted'] - a['exact'], c['weighted'] - c['exact'], dim=0)):.3f}; "
              f"{contrast.name}: cos of the two batches' summed dX errors "
              f"{float(cos(layer_errors[0].sum(0), layer_errors[1].sum(0), dim=0)):.3f}", flush=True)
    return rows


DIAG_COLUMNS = ["phase", "batch", "p_label", "keep", "tokens", "labels_kept", "rel_none", "rel_uniform", "rel_weighted",
                "cos_mu",
                "pair_none", "pair_weighted", "easy", "rel_easy_none", "rel_easy_weighted", "grad_none",
                "grad_weighted"]
DIAG_FORMATS = {"p_label": "{:.3f}", "keep": "{:.2f}", "labels_kept": "{:.3f}",
                **{c: "{:.4f}" for c in ("rel_none", "rel_uniform", "rel_weighted", "rel_easy_none",
                                          "rel_easy_weighted", "grad_none", "grad_weighted")},
                **{c: "{:.3f}" for c in ("cos_mu", "pair_none", "pair_weighted")}}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=None, help="T (default 256 on CPU, 4096 on CUDA)")
    p.add_argument("--keeps", default="0.05,0.1,0.2")
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (CPU default: smollm2-135m)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    p.add_argument("--diagnose", action="store_true", help="the error's structure on SmolLM2 / PIQA (see above)")
    p.add_argument("--grad", action="store_true", help="with --diagnose: also the LoRA gradient's error")
    p.add_argument("--batches", type=int, default=2, help="--diagnose: micro-batches")
    p.add_argument("--batch", type=int, default=8, help="--diagnose: records per micro-batch")
    p.add_argument("--steps", type=int, default=0, help="--diagnose: Adam steps on batch 0 first (exact head)")
    a = p.parse_args(argv)
    if a.diagnose:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        print(f"LM-head error diagnosis, {machine_line('cpu', 'fp32')}", flush=True)
        return diagnose(a.batches, a.batch, [float(k) for k in a.keeps.split(",")], a.grad, a.smoke, a.steps)
    if a.smoke:
        SHAPES["smoke"] = (512, 32)
        shapes, tokens, repeats = ["smoke"], 16, 2
    else:
        default_shapes = "smollm2-135m" if a.device == "cpu" else ",".join(SHAPES)
        shapes = (a.shapes or default_shapes).split(",")
        tokens, repeats = a.tokens or (256 if a.device == "cpu" else 4096), a.repeats
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    keeps = [float(k) for k in a.keeps.split(",")]
    print(f"LM-head backward, {machine_line(a.device, a.dtype)}", flush=True)
    return run(shapes, keeps, tokens, a.dtype, a.device, repeats)


if __name__ == "__main__":
    main()
