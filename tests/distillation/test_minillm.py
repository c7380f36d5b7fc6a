"""MiniLLM computed as the reference does (github microsoft/LMOps, minillm/minillm/losses.py and
sampler.py): the length-normalised return, whitened advantages, the PPO clip of ratio·w, the
unweighted single-step term and the pretraining mix, on small hand-made batches. Every
expected number is written out with the formula that gives it."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cbd_ray import objectives as O
from cbd_ray.train import DistillConfig

from conftest import ROOT


def test_return_includes_r_t_and_divides_by_the_tokens_from_t_on():
    r = torch.tensor([[1.0, 2.0, 4.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    # γ = 1: R_t = Σ_{t'≥t} r_t' / n_t → [(1+2+4)/3, (2+4)/2, 4/1]
    assert O.length_normalised_returns(r, m, 1.0).flatten().tolist() == pytest.approx([7 / 3, 3.0, 4.0])
    r2 = torch.tensor([[1.0, 2.0, 4.0, 0.0], [2.0, -1.0, 9.0, 9.0]])  # row 2: the 9s are padding
    m2 = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    # γ = 0.5, row 1: [(1 + .5·2 + .25·4)/3, (2 + .5·4)/2, 4/1, 0/1 (padding: n_t = 0 → 1)]
    # row 2: [(2 + .5·(−1))/2, −1/1, 0, 0] (padding rewards are zeroed before summing)
    out = O.length_normalised_returns(r2, m2, 0.5)
    assert out.flatten().tolist() == pytest.approx([1.0, 2.0, 4.0, 0.0, 0.75, -1.0, 0.0, 0.0])


def test_advantages_are_whitened_over_the_response_grid_padding_included():
    x = torch.tensor([[1.0, 2.0, 4.0, 0.0], [0.75, -1.0, 0.0, 0.0]])
    # mean = 6.75/8 = 0.84375; unbiased var = Σ(x−mean)²/7 = 2.409598; (x − mean)/sqrt(var + 1e-8)
    want = [0.10066, 0.74487, 2.03329, -0.54355, -0.06039, -1.18776, -0.54355, -0.54355]
    assert O.whiten(x).flatten().tolist() == pytest.approx(want, abs=1e-5)
    # one rollout row: prompt width 2, three response tokens, room for n_new = 4 (one padding
    # column, as the reference's generate pads to max_length − max_prompt_length).
    # mask is over next-token targets [B, T−1]; the response starts at column P − 1 = 1.
    mask = torch.tensor([[0, 1, 1, 1]]).bool()
    reward = torch.tensor([1.0, 2.0, 4.0])
    # returns (γ = 1) [7/3, 3, 4, 0]: mean 7/3, var = (0² + (2/3)² + (5/3)² + (7/3)²)/3 = 2.888889
    # whitened [0, 0.392232, 0.980581, −1.372813]; the counted three come back
    adv = O.rollout_advantages(reward, mask, prompt_width=2, n_new=4, gamma=1.0)
    assert adv.tolist() == pytest.approx([0.0, 0.392232, 0.980581], abs=1e-5)
    raw = O.rollout_advantages(reward, mask, prompt_width=2, n_new=4, gamma=1.0, use_whiten=False)
    assert raw.tolist() == pytest.approx([7 / 3, 3.0, 4.0])


class _TwoRanks:
    """A fake data-parallel group of two ranks, one thread each: ``reducer(rank)`` sums a
    tensor over both ranks in place, as ``all_reduce`` does."""

    def __init__(self) -> None:
        import threading

        self.barrier, self.slots = threading.Barrier(2), [None, None]

    def reducer(self, rank: int):
        def reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()  # both have read before either writes the next call's slot
            t.copy_(total)
            return t

        return reduce


def _on_two_ranks(fn, args0, args1):
    from concurrent.futures import ThreadPoolExecutor

    group = _TwoRanks()
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(fn, *args0, reduce=group.reducer(0))
        b = pool.submit(fn, *args1, reduce=group.reducer(1))
        return a.result(timeout=30), b.result(timeout=30)


def test_advantages_are_whitened_over_every_ranks_grid_together():
    """LMOps whitens its batch gathered over data-parallel ranks: each rank's whitened grid is
    its part of whitening both ranks' grids concatenated (grids of different widths included),
    and without a group (one process) nothing changes."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(3, 5, generator=g) * 2 + 1, torch.randn(2, 7, generator=g) - 3
    w0, w1 = _on_two_ranks(O.whiten, (x0,), (x1,))
    both = O.whiten(torch.cat([x0.flatten(), x1.flatten()]))
    assert w0.flatten().tolist() == pytest.approx(both[:15].tolist(), abs=1e-6)
    assert w1.flatten().tolist() == pytest.approx(both[15:].tolist(), abs=1e-6)
    assert float(O.whiten(x0).mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(w0.mean()) != pytest.approx(0.0, abs=1e-3)  # rank 0's part of a whole: not centred alone
    # the rollout: rank 0 holds the row of test_advantages_are_whitened_over_the_response_grid_padding_included
    # (returns [7/3, 3, 4, 0] on a grid of n_new = 4), rank 1 a row with returns [1, 1, 1, 1]
    mask0, mask1 = torch.tensor([[0, 1, 1, 1]]).bool(), torch.tensor([[0, 1, 1, 1, 1]]).bool()
    a0, a1 = _on_two_ranks(O.rollout_advantages, (torch.tensor([1.0, 2.0, 4.0]), mask0, 2, 4, 1.0),
                           (torch.tensor([1.0, 1.0, 1.0, 1.0]), mask1, 2, 4, 1.0))
    grid = O.whiten(torch.tensor([7 / 3, 3.0, 4.0, 0.0, 1.0, 1.0, 1.0, 1.0]))
    assert a0.tolist() == pytest.approx(grid[:3].tolist(), abs=1e-6)
    assert a1.tolist() == pytest.approx(grid[4:].tolist(), abs=1e-6)
    assert O.rank_sum() is None  # no process group here: rollout_advantages whitens its own grid


def test_ppo_clip_acts_on_ratio_times_w():
    eps = 0.2
    lp_minus_old = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.0]))
    rho = torch.tensor([1.0, 0.5, 1.0, 2.0])
    adv = torch.tensor([1.0, 1.0, -2.0, 1.0])
    out = O.ppo_term(lp_minus_old, torch.zeros(4), rho, adv, eps)
    # ρ̃ = ratio·w; loss = max(−A·ρ̃, −A·clip(ρ̃, 0.8, 1.2))
    want = [max(-1.5, -1.2),        # ρ̃ 1.5, A 1   → −1.2
            max(-0.75, -0.8),       # ρ̃ 0.75, A 1  → −0.75
            max(1.0, 1.6),          # ρ̃ 0.5, A −2  → 1.6
            max(-2.0, -1.2)]        # ρ̃ 2.0, A 1   → −1.2 (clipping ρ alone, w outside, gave −2)
    assert out.tolist() == pytest.approx(want)


def _policy_setup():
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(3, 2, bias=False), torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        head_s.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        head_t.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # student logits: row 0 [0, 0] → q = [.5, .5]; row 1 [ln 3, 0] → q = [3/4, 1/4]; teacher 0 → p = [.5, .5]
    h = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0]], requires_grad=True)
    t_rows = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    r = {"t_rows": t_rows, "targets": torch.tensor([0, 1]),
         "old_lp": torch.log(torch.tensor([0.5, 0.25])),   # the current policy's own probabilities
         "rho": torch.tensor([3.0, 0.1]), "adv": torch.tensor([1.0, -1.0])}
    return head_s, head_t, h, r


def test_single_step_term_is_not_weighted_and_pg_matches_the_formula():
    head_s, head_t, h, r = _policy_setup()
    cfg = SimpleNamespace(temperature=1.0, clip=0.2, chunk_size=1, kd_chunk_bytes=1 << 20)
    pg, single = O._policy_terms(head_s, head_t, h, r, cfg, O.StepContext())
    # q row 0 = [.5, .5], row 1 = [3/4, 1/4]; p = [.5, .5] both rows (teacher logits 0)
    # KL(q‖p): row 0 = 0; row 1 = .75·ln(1.5) + .25·ln(.5) = 0.130812; mean = 0.065406 (ρ ignored)
    assert float(single.detach()) == pytest.approx((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2, abs=1e-6)
    # ratio = 1 both rows (old = current); ρ̃ = ρ: row 0 max(−3, −1.2) = −1.2; row 1 max(0.1, 0.8) = 0.8
    assert float(pg.detach()) == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    # two chunks under checkpoint == one chunk: values and gradients
    (pg + single).backward()
    g1 = h.grad.clone()
    h.grad = None
    cfg.chunk_size = 8
    pg2, single2 = O._policy_terms(head_s, head_t, h, r, cfg, O.StepContext())
    (pg2 + single2).backward()
    assert float(pg2.detach()) == pytest.approx(float(pg.detach())) and torch.allclose(h.grad, g1, atol=1e-7)


def test_single_step_kl_by_hand():
    log_q = torch.log(torch.tensor([[0.5, 0.5]]))
    log_p = torch.log(torch.tensor([[0.25, 0.75]]))
    # .5·ln(.5/.25) + .5·ln(.5/.75) = 0.143841
    assert float(O.single_step_kl(log_q, log_p)) == pytest.approx(0.143841, abs=1e-6)


def test_reference_defaults_and_the_pretraining_term_needs_text():
    from pydantic import ValidationError

    cfg = DistillConfig(objective="minillm")
    # lm_coef None = the reference's 1 whenever pretraining text is given
    assert (cfg.gamma, cfg.clip, cfg.reward_scaling, cfg.reward_clip, cfg.lm_coef, cfg.kd_ratio, cfg.whiten) == (
        0.95, 0.2, 0.5, 100.0, None, 0.5, True)
    assert DistillConfig(**cfg.model_dump()) == cfg  # survives the trip to the workers
    with pytest.raises(ValidationError, match="lm_coef 0.5 needs lm_data"):
        DistillConfig(objective="minillm", lm_coef=0.5)


def test_minillm_defaults_to_the_authors_recipe_and_written_settings_win():
    """LMOps: eval-mode policy, constant rate after 100 warm-up steps, weight decay 1e-6, a stop
    at 10 epochs over the prompts, prompts over 256 tokens dropped; the paper: best checkpoint
    by validation Rouge-L. Other objectives keep their defaults."""
    keys = ("dropout_off", "schedule", "warmup", "weight_decay", "max_prompt_epochs", "max_prompt_len",
            "select_best_by")
    cfg = DistillConfig(objective="minillm")
    assert tuple(getattr(cfg, k) for k in keys) == (True, "constant", 100, 1e-6, 10.0, 256, "rougeL")
    for objective in ("sft", "kd", "on_policy", "seqkd"):
        other = DistillConfig(objective=objective)
        assert tuple(getattr(other, k) for k in keys) == (False, "cosine", 0, 0.0, None, None, "loss"), objective
    mine = DistillConfig(objective="minillm", warmup=5, schedule="cosine", max_prompt_epochs=None, max_prompt_len=None,
                         select_best_by="loss", dropout_off=False)
    assert (mine.warmup, mine.schedule, mine.max_prompt_epochs, mine.max_prompt_len, mine.select_best_by,
            mine.dropout_off, mine.weight_decay) == (5, "cosine", None, None, "loss", False, 1e-6)
    assert DistillConfig(**mine.model_dump()) == mine  # the workers get the same settings


def test_paper_configs_turn_the_pretraining_term_on():

    import yaml

    for name in ("gpt2", "pythia", "qwen3"):
        d = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["distill"]
        assert d["lm_data"] and d.get("lm_coef", 1.0) == 1.0 and d.get("kd_ratio", 0.5) == 0.5, name


@pytest.fixture(scope="module")
def pair_models(tmp_path_factory, tokenizer):
    from distill_models import make_pair

    from cbd_ray.train import _load_model

    t, s = make_pair(tmp_path_factory.mktemp("pair"), tokenizer)
    return _load_model(str(t), torch.float32), _load_model(str(s), torch.float32)


def test_pretraining_term_mixes_ce_and_forward_kd(pair_models):
    teacher, student = pair_models
    lm = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(objective="minillm", kd_ratio=0.5, chunk_size=5)
    loss, parts = O.pretrain_loss(student, teacher, lm, cfg, O.StepContext(vocab=512))
    with torch.no_grad():
        q = torch.log_softmax(student(lm).logits[:, :-1].float(), -1)
        p = torch.log_softmax(teacher(lm).logits[:, :-1].float(), -1)
    ce = -q.gather(-1, lm[:, 1:, None]).mean()                  # every next token counted
    fkl = (p.exp() * (p - q)).sum(-1).mean()                     # KL(p ‖ q) per token
    assert float(loss.detach()) == pytest.approx(float(0.5 * ce + 0.5 * fkl), rel=1e-5)
    assert parts["lm_ce"] == pytest.approx(float(ce), rel=1e-5) and parts["lm_fkl"] == pytest.approx(float(fkl), rel=1e-5)


def test_rollout_counts_eos_and_not_what_follows_when_pad_is_eos(pair_models, tokenizer):
    """The reference's mask is ``token[t-1] != pad`` on the response (pad = eos for GPT-2):
    the sampled EOS is a target, the padding after it is not. Ours must be the same."""
    teacher, student = pair_models
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "loss_mask": torch.zeros_like(prompt),
             "prompt_length": torch.tensor([4, 4])}
    cfg = DistillConfig(objective="minillm", max_new_tokens=12, max_len=64)

    def rollout(eos):
        ctx = O.StepContext(vocab=512, pad_id=eos or 0, eos_id=eos, max_len=64,
                            generator=torch.Generator().manual_seed(3))
        return O.MiniLLM().rollout(student, teacher, batch, cfg, ctx)

    free = rollout(None)["seq"]["input_ids"][0, 4:].tolist()
    # the same draws with EOS = the row's 4th new token (new there, not in the prompt): row 0 stops at it
    eos = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i] and t not in prompt.tolist()[0])
    r = rollout(eos)
    full, p = r["seq"]["input_ids"], r["seq"]["prompt_width"]
    assert int((full[0, p:] == eos).nonzero()[0]) == free.index(eos)
    ref = (full != eos)[:, p - 1:-1]                              # sampler.py: mask of the predicting token
    assert torch.equal(r["mask"][:, p - 1:], ref)
    assert bool(r["mask"][0, p - 1 + free.index(eos)])           # the EOS itself is counted
    assert r["adv"].shape[0] == int(ref.sum()) == r["old_lp"].shape[0]
