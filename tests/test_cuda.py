"""The meta-gradient learner and the EPG inner loop on a CUDA GPU: same numbers as on the CPU, training
and resume on the GPU.

Skipped where no GPU is present (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from epg_helpers import TINY_INNER, TINY_NET, evolve_config, tiny_phi
from test_metagrad import A, metagrad_config, one_torch_thread, synthetic_rollout  # noqa: F401
from test_metagrad_training import FRAMES_PER_UPDATE, train_until_killed_in_update_3, training_config

from pipeline.config import MetaConfig
from pipeline.devices import resolve_device
from pipeline.envs.tasks import sample_tasks
from pipeline.epg.inner import LossSetting, run_lifetimes
from pipeline.metagrad.learner import MetaGradientLearner
from pipeline.metagrad.train import limit_cpu_threads_for, train_variant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def exact_float32():
    """TF32 matmuls/convolutions (PyTorch's default for cuDNN convolutions) round to 10 mantissa bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def learner_on(device: str, grad_mode: str) -> MetaGradientLearner:
    config = metagrad_config(meta=MetaConfig(grad_mode=grad_mode, init_gamma=0.9, init_lambda=0.8))
    torch.manual_seed(0)  # the same initial network on both devices (built on the CPU, then moved)
    return MetaGradientLearner(config, "gamma_lambda", A, 10, device)


def three_updates(learner: MetaGradientLearner) -> list[dict[str, float]]:
    return [learner.update(synthetic_rollout(seed).to(learner.device)) for seed in (10, 11, 12)]


@pytest.mark.parametrize("grad_mode", ["jvp", "naive"])
def test_cuda_updates_and_meta_gradients_match_the_cpu(grad_mode, exact_float32):
    cpu, gpu = learner_on("cpu", grad_mode), learner_on("cuda", grad_mode)
    cpu_stats, gpu_stats = three_updates(cpu), three_updates(gpu)
    assert all(p.device.type == "cuda" for p in gpu.net.parameters())
    assert gpu.eta_logits.device.type == "cuda"
    for key in ("loss/total", "grad_norm", "meta/grad_gamma_logit", "meta/grad_lambda_logit"):
        assert gpu_stats[-1][key] == pytest.approx(cpu_stats[-1][key], rel=1e-3, abs=1e-6), key
    torch.testing.assert_close(gpu.eta_logits.cpu(), cpu.eta_logits, rtol=1e-5, atol=1e-7)
    for (name, p), q in zip(gpu.net.named_parameters(), cpu.net.parameters(), strict=True):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-4, atol=1e-6, msg=name)


def test_training_on_the_gpu_checkpoints_and_resumes_there(tmp_path, monkeypatch):
    """A run killed in update 3 resumes from the update-2 checkpoint with every state on the GPU."""
    config = training_config(device="auto", frames=3 * FRAMES_PER_UPDATE)
    assert resolve_device(config.device).type == "cuda"
    checkpoint = tmp_path / "pong_gamma_lambda.pt"
    state = train_until_killed_in_update_3(config, checkpoint, monkeypatch)
    assert state["updates"] == 2
    assert len(state["rng"]["cuda"]) == torch.cuda.device_count()  # actions are sampled on the GPU

    result, learner = train_variant(config, "pong", "gamma_lambda", 0, checkpoint)
    assert (result.updates, result.history.gammas[:2]) == (3, state["history"]["gammas"])
    assert learner.eta_logits.device.type == "cuda"
    optimizer_state = [s["square_avg"] for s in learner.optimizer.state.values()]
    assert optimizer_state and all(t.device.type == "cuda" for t in optimizer_state)
    assert all(
        t.device.type == "cuda"
        for t in learner.meta_optimizer.state[learner.eta_logits].values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


def test_a_gpu_run_leaves_the_cores_to_the_emulator():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        limit_cpu_threads_for(torch.device("cuda"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ EPG
@pytest.mark.parametrize("method", ["epg", "ppo"])
def test_epg_lifetimes_on_the_gpu_equal_the_cpu(exact_float32, method):
    """Same CPU-drawn random numbers on both devices: only float rounding differs."""
    tasks = sample_tasks("point_goal", "train", 3, 1)
    setting = (
        LossSetting("epg", phi=tiny_phi("point_goal", 2), alpha=0.5)
        if method == "epg"
        else LossSetting("ppo", num_members=2)
    )
    cpu = run_lifetimes("point_goal", tasks, TINY_INNER, setting, TINY_NET, 7, "cpu")
    gpu = run_lifetimes("point_goal", tasks, TINY_INNER, setting, TINY_NET, 7, "cuda")
    assert gpu.fitness.device.type == "cpu"  # results always come back to the host
    assert torch.isfinite(gpu.fitness).all()
    assert torch.allclose(gpu.fitness, cpu.fitness, rtol=1e-3, atol=1e-3)
    assert torch.allclose(gpu.curve, cpu.curve, rtol=1e-3, atol=1e-3, equal_nan=True)
    assert gpu.env_steps == cpu.env_steps


def test_evolve_problem_evaluates_on_the_gpu(exact_float32):
    pytest.importorskip("ray", reason="EvoTorch imports Ray")
    from pipeline.epg.problem import EPGProblem

    config = evolve_config(device="cuda")
    tasks = sample_tasks("point_goal", "train", 8, 0)
    phis = tiny_phi("point_goal", 3)
    gpu = EPGProblem(config, tasks, phis[0], seed=11).evaluate_phis(phis, generation=0)
    cpu = EPGProblem(config.model_copy(update={"device": "cpu"}), tasks, phis[0], seed=11).evaluate_phis(
        phis, generation=0
    )
    assert torch.allclose(gpu.fitness, cpu.fitness, rtol=1e-3, atol=1e-3)
