"""End-to-end sensitivity: where a layer's own output error and what it costs at the model's output
disagree, the Fisher-weighted policy follows the output, and the loss shows it."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ciuic_lab.compress.policies import LayerProfile, get_policy
from ciuic_lab.compress.policies.sensitivity import allocate_formats, grid_bits
from ciuic_lab.compress.quant.rtn import RTN
from ciuic_lab.compress.walk.blocks import Resident
from ciuic_lab.compress.walk.pipeline import compress_model, output_fisher_walk
from ciuic_lab.models import tiny

CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))


def _model():
    torch.manual_seed(0)
    return tiny.build("tiny-random-llama", vocab=256)


def _rescaled(model, alpha=1e-2):
    """The same function with the layers' scales moved: block 0's values shrunk (v_proj rows
    x alpha, o_proj columns / alpha) and block 1's up projection blown up (up_proj rows / alpha,
    down_proj columns x alpha). Each layer's own output error moves by alpha^±2; what it costs
    at the output does not."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        a0, a1 = m.model.layers[0].self_attn, m.model.layers[1].mlp
        a0.v_proj.weight.mul_(alpha)
        a0.o_proj.weight.div_(alpha)
        a1.up_proj.weight.div_(alpha)
        a1.down_proj.weight.mul_(alpha)
    return m


def _kl(model, dense) -> float:
    with torch.no_grad():
        ref = F.log_softmax(dense(CALIB).logits, -1)
        got = F.log_softmax(model(CALIB).logits, -1)
    return float(F.kl_div(got, ref, log_target=True, reduction="batchmean"))


def _allocate(model, sensitivity):
    m = copy.deepcopy(model)
    report = compress_model(m, CALIB, [RTN(3, 32, policy="sensitivity", avg_bits=3.0,
                                           candidate_bits=[2, 3, 4], sensitivity=sensitivity)],
                            batch_size=4, progress=False)
    return report.allocations["quant"], m


def test_rescaling_moves_the_local_policy_but_not_the_fisher_one():
    base, scaled = _model(), _rescaled(_model())
    assert torch.allclose(scaled(CALIB).logits, base(CALIB).logits, atol=1e-4)  # same function
    fisher_base, _ = _allocate(base, "fisher")
    fisher_scaled, m_fisher = _allocate(scaled, "fisher")
    local_scaled, m_local = _allocate(scaled, "local")
    v, up = "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"
    assert fisher_scaled == fisher_base  # the output's view does not change with the scales
    assert local_scaled[v] == 2 and local_scaled[up] == 4  # the local view follows the scales
    assert fisher_scaled != local_scaled
    # and the output agrees with the Fisher view: less output distortion at the same mean bits.
    # Measured as the KL to the dense model's next-token distribution: this random model is
    # near uniform (loss ≈ ln 256), so its loss on random tokens moves by noise only.
    assert 2 * _kl(m_fisher, scaled) < _kl(m_local, scaled)


def test_output_fisher_walk_matches_autograd_on_the_whole_model():
    model = _model()
    fisher = output_fisher_walk(Resident(model, torch.device("cpu")), CALIB, batch_size=4,
                                progress=False)
    grads = {}

    def hook(_m, _a, out, name):
        def add(g):
            grads[name] = grads.get(name, 0) + (g ** 2).sum((0, 1))
        out.register_hook(add)

    hooks = [mod.register_forward_hook(lambda m, a, out, name=name: hook(m, a, out, name))
             for name, mod in model.named_modules() if name.endswith(("v_proj", "down_proj"))]
    for start in range(0, 8, 4):
        ids = CALIB[start:start + 4]
        logits = model(ids).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    for h in hooks:
        h.remove()
    for name, g in grads.items():
        assert torch.allclose(fisher[name], g, rtol=1e-4, atol=1e-12), name


def _autograd_fisher(model, names_end):
    """F of the named layers by plain autograd through the whole (resident) model."""
    grads = {}

    def hook(_m, _a, out, name):
        def add(g):
            grads[name] = grads.get(name, 0) + (g ** 2).reshape(-1, g.shape[-1]).sum(0)
        out.register_hook(add)

    hooks = [mod.register_forward_hook(lambda m, a, out, name=name: hook(m, a, out, name))
             for name, mod in model.named_modules() if name.endswith(names_end)]
    for start in range(0, 8, 4):
        ids = CALIB[start:start + 4]
        logits = model(ids).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
    for h in hooks:
        h.remove()
    return grads


def test_fisher_walk_through_chunked_experts_matches_autograd(tmp_path):
    """The MoE backward goes through the experts a chunk at a time (never all in autograd);
    every layer's F, routed experts' included, equals plain autograd's, and a streamed model
    (experts never resident) gives the same."""
    from ciuic_lab.compress.walk.blocks import Streamed
    from ciuic_lab.models.loader import skeleton
    from ciuic_lab.models.source import CheckpointSource

    torch.manual_seed(0)
    model = tiny.build("tiny-random-deepseek-v3", vocab=256)
    model.set_experts_implementation("eager")
    fisher = output_fisher_walk(Resident(model, torch.device("cpu")), CALIB, 4, False,
                                expert_chunk=3)
    ref = _autograd_fisher(model, ("q_a_proj", "o_proj", "shared_experts.down_proj"))
    for name, g in ref.items():
        assert torch.allclose(fisher[name], g, rtol=1e-3, atol=1e-10), name
    # a routed expert's down projection by hand: its output x routing weight, autograd'ed
    experts = [n for n in fisher if ".experts." in n]
    assert len(experts) == 2 * 8 * 2 and all(torch.isfinite(fisher[n]).all() for n in experts)
    assert fisher["model.layers.1.mlp.experts.0.gate_up_proj"].shape == (64,)  # 2 x 32 rows
    model.save_pretrained(tmp_path / "src")
    streamed = Streamed(skeleton(str(tmp_path / "src"), torch.float32),
                        CheckpointSource.from_dir(tmp_path / "src"), "cpu")
    sf = output_fisher_walk(streamed, CALIB, 4, False, expert_chunk=3)
    assert set(sf) == set(fisher)
    for name in fisher:
        assert torch.allclose(sf[name], fisher[name], rtol=1e-4, atol=1e-12), name


def test_formats_meet_the_stored_budget_and_pay_for_their_grids():
    errors = [{(2, 32): 5.0, (3, 128): 4.0, (4, 128): 1.0}, {(2, 32): 1.0, (3, 128): 0.9,
                                                             (4, 128): 0.8}]
    costs = [{k: k[0] + grid_bits(k[1], 128, True) for k in e} for e in errors]
    chosen = allocate_formats(errors, costs, [100, 100], 3.2)
    spent = sum(costs[i][k] for i, k in enumerate(chosen)) / 2
    # 4 bits for the sensitive layer does not fit; 3 bits for both does, and errs least
    assert spent <= 3.2 + 1e-9 and chosen == [(3, 128), (3, 128)]
    chosen = allocate_formats(errors, costs, [100, 100], 3.4)
    assert chosen[0] == (4, 128)  # with the room, the sensitive layer gets the bits


@pytest.mark.parametrize("target", [3.0, 3.5])
def test_the_policy_is_never_predicted_worse_than_uniform(target):
    torch.manual_seed(0)
    pol = get_policy("quant", "sensitivity", candidate_bits=[2, 3, 4], group_size=32, sym=True)
    ps = [LayerProfile(f"l{i}", "mlp", (32, 64), i) for i in range(6)]
    from ciuic_lab.compress.stats import LayerStats

    for p in ps:
        st = LayerStats(64, hessian=True)
        st.add_batch(torch.randn(64, 64))
        p.facts["quant"] = {"output_fisher": torch.rand(32)}
        pol.summarize(p.facts["quant"], torch.randn(32, 64), st)
    alloc = pol.allocate(ps, target)
    uniform = get_policy("quant", "uniform").allocate(ps, target)
    err = lambda a: sum(p.facts["quant"]["errors"][(a[p.name], 32)] for p in ps)  # noqa: E731
    assert err(alloc) <= err(uniform) + 1e-9


def test_output_fisher_walk_keeps_the_depth_of_block_inputs_off_host_memory(monkeypatch):
    """The backward walk's per-block inputs grow with depth: on CPU under "auto" they go to disk
    (host memory stays bounded by one block), and the Fisher weights are the same."""
    from ciuic_lab.compress.walk import blocks

    model = _model()
    want = output_fisher_walk(Resident(model, torch.device("cpu")), CALIB, 4, False,
                              activations="device")
    chosen = []
    real_fill = blocks.Activations.fill

    def fill(self, tensors):
        out = real_fill(self, tensors)
        chosen.append(self.chosen)
        return out

    monkeypatch.setattr(blocks.Activations, "fill", fill)
    got = output_fisher_walk(Resident(model, torch.device("cpu")), CALIB, 4, False)
    n = len(model.model.layers)
    assert chosen == ["device"] + ["disk"] * n  # block 0's captured input, then every block's output
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
