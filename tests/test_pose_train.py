"""The keypoint network, its losses, training (loss falls, kill -9 resume, DDP) and evaluation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bpnp.losses import BPnPADDLoss, BPnPReprojectionLoss, keypoint_loss
from bpnp.pose.model import KeypointHeatmapNet, heatmap_confidence, heatmap_loss, heatmap_targets, soft_argmax
from bpnp.synthetic import random_problems


def test_network_shapes_and_soft_argmax():
    net = KeypointHeatmapNet(9, width=8)
    out = net(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 9, 16, 12)
    coords = torch.tensor([[[20.3, 31.7], [5.0, 40.2]]], dtype=torch.float64)
    target = heatmap_targets(coords, (16, 12), stride=4, sigma=1.0)
    assert torch.allclose(target.flatten(2).sum(-1), torch.ones(1, 2, dtype=torch.float64))
    # The soft-argmax of the target's own logits is its centre (away from the border).
    found, probs = soft_argmax(torch.log(target[:, :1]), stride=4)
    assert torch.allclose(found[0, 0], coords[0, 0], atol=1e-6)
    conf = heatmap_confidence(probs, found, stride=4)
    assert 0.5 < float(conf) <= 1.0


def test_windowed_readout_ignores_a_second_mode():
    logits = torch.full((1, 1, 16, 16), -30.0, dtype=torch.float64)
    logits[0, 0, 3, 3] = 0.0  # the peak, at pixel (13.5, 13.5)
    logits[0, 0, 12, 12] = -0.5  # a weaker second mode
    global_uv, _ = soft_argmax(logits, 4)
    local_uv, _ = soft_argmax(logits, 4, window=2)
    assert torch.allclose(local_uv[0, 0], torch.tensor([13.5, 13.5], dtype=torch.float64))
    assert global_uv[0, 0, 0] > 25  # dragged towards the second mode
    logits.requires_grad_()
    soft_argmax(logits, 4, window=2)[0].sum().backward()
    assert torch.isfinite(logits.grad).all() and abs(float(logits.grad[0, 0, 12, 12])) < 1e-12


def test_heatmap_loss_zero_at_target_and_ignores_points_off_the_map():
    coords = torch.tensor([[[20.0, 30.0], [500.0, 10.0]]])
    target = heatmap_targets(coords, (16, 16), 4, 1.0)
    assert float(target[0, 1].sum()) == 0.0  # off the map: no target
    logits = torch.log(target.clamp_min(1e-30))
    assert float(heatmap_loss(logits, coords)) == pytest.approx(0.0, abs=1e-4)
    assert float(heatmap_loss(torch.zeros(1, 2, 16, 16), coords)) > 1.0


def test_bpnp_reprojection_loss_exact_gradient():
    p = random_problems(B=3, n=9, noise=0.0, seed=4, dtype=torch.float64)
    loss_fn = BPnPReprojectionLoss(weight=0.5)
    x_true = p.x2d.clone()
    # Noise-free keypoints: the pose is exact, so the reprojection loss vanishes.
    assert float(loss_fn(x_true, p.x3d, p.K, x_true)) < 1e-12
    x = (x_true + torch.randn_like(x_true)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: loss_fn(v, p.x3d, p.K, x_true), (x,), eps=1e-6, atol=1e-7, rtol=1e-6)
    warm = BPnPReprojectionLoss(warmup_steps=10)
    assert float(warm(x, p.x3d, p.K, x_true, step=3).detach()) == 0.0
    assert float(warm(x, p.x3d, p.K, x_true, step=10).detach()) > 0.0
    assert float(keypoint_loss(x_true + 2.0, x_true)) == pytest.approx(8.0)


def test_bpnp_add_loss_is_the_add_of_the_bpnp_pose_with_exact_gradient():
    from bpnp import metrics, project, solve_pnp

    p = random_problems(B=3, n=9, noise=0.0, seed=4, dtype=torch.float64)
    model = p.x3d[0]  # one object seen in three poses
    x_true = project(model, p.pose, p.K)
    loss_fn = BPnPADDLoss(scale=2.0, weight=0.5)
    # Noise-free keypoints: the pose is the true one, so the loss vanishes.
    assert float(loss_fn(x_true, model, p.K, p.pose)) < 1e-9
    x = x_true + torch.randn(x_true.shape, generator=torch.Generator().manual_seed(0), dtype=x_true.dtype)
    x.requires_grad_()
    # The value: weight x ADD of the model points under the layer's pose / scale.
    pose = solve_pnp(x.detach(), model, p.K).pose
    expected = 0.5 * metrics.add(pose, p.pose, model).mean() / 2.0
    assert float(loss_fn(x, model, p.K, p.pose).detach()) == pytest.approx(float(expected), rel=1e-9)
    assert torch.autograd.gradcheck(lambda v: loss_fn(v, model, p.K, p.pose), (x,), eps=1e-6, atol=1e-7, rtol=1e-6)
    # A depth error counts at its full length: the true pose 1 unit further along the ray.
    far = p.pose.clone()
    far[:, 3:] *= 1.0 + 1.0 / p.pose[:, 3:].norm(dim=-1, keepdim=True)
    assert float(BPnPADDLoss()(x_true, model, p.K, far)) == pytest.approx(1.0, rel=1e-6)
    assert float(BPnPADDLoss()(x_true, model, p.K, far, points=model[:2])) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="scale"):
        BPnPADDLoss(scale=0.0)
    with pytest.raises(ValueError, match="shared"):
        loss_fn(x, p.x3d, p.K, p.pose)
    with pytest.raises(ValueError, match=r"pose_true: expected \(3, 6\)"):
        loss_fn(x, model, p.K, p.pose[:2])


def test_pnp_weights_from_the_heatmaps_carry_an_exact_gradient():
    # With learned weights the pose loss reaches the heatmaps twice: through the keypoints and
    # through their confidences, the PnP weights. Both paths, checked along random directions.
    from bpnp import project

    gen = torch.Generator().manual_seed(3)
    model = torch.rand(9, 3, generator=gen, dtype=torch.float64) * 10 - 5
    K = torch.tensor([[40.0, 0, 16], [0, 40, 16], [0, 0, 1]], dtype=torch.float64)
    pose = torch.tensor([[0.3, -0.2, 0.1, 0.5, -0.4, 30.0]], dtype=torch.float64)
    kp = project(model, pose, K)  # within the 32 px image
    noisy = kp + torch.randn(kp.shape, generator=gen, dtype=kp.dtype)
    logits = torch.log(heatmap_targets(noisy, (8, 8), 4, 1.2).clamp_min(1e-12))
    logits = logits + 0.3 * torch.randn(logits.shape, generator=gen, dtype=logits.dtype)
    loss_fn = BPnPADDLoss(scale=10.0, confidence_weighted=True)

    def loss(v, learned=True):
        coords, probs = soft_argmax(v, 4, window=3)
        w = heatmap_confidence(probs, coords, 4)
        return loss_fn(coords, model, K, pose, weights=w if learned else w.detach())

    v = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(v), v)
    (grad_fixed,) = torch.autograd.grad(loss(v, learned=False), v)
    assert (grad - grad_fixed).norm() > 0.05 * grad.norm()  # the weights' path counts
    eps = 1e-6
    for _ in range(4):
        d = torch.randn(logits.shape, generator=gen, dtype=logits.dtype)
        numeric = (loss(logits + eps * d) - loss(logits - eps * d)) / (2 * eps)
        assert float((grad * d).sum()) == pytest.approx(float(numeric), rel=1e-5, abs=1e-9)


def test_a_weight_head_starts_at_the_confidences_and_leaves_the_heatmaps_alone():
    from bpnp.pose.model import learned_weight_factor, split_outputs

    torch.manual_seed(0)
    plain = KeypointHeatmapNet(9, width=8)
    torch.manual_seed(0)
    headed = KeypointHeatmapNet(9, width=8, weight_head=True)
    image = torch.randn(2, 3, 32, 32)
    plain.eval(), headed.eval()
    logits, weight_logits = split_outputs(headed(image))
    plain_logits, none = split_outputs(plain(image))
    # The same heatmap network (its weights drawn before the head's), the head zero: factor 1.
    assert torch.equal(logits, plain_logits) and none is None and weight_logits.shape == logits.shape
    coords, probs = soft_argmax(logits, 4)
    assert torch.equal(learned_weight_factor(weight_logits, probs), torch.ones(2, 9))
    # The factor's gradient reaches the head's logits, never the heatmaps.
    v = torch.randn(2, 9, 8, 8, requires_grad=True)
    probs = torch.softmax(v.flatten(2), -1).view_as(v)
    lw = torch.randn(2, 9, 8, 8, requires_grad=True)
    factor = learned_weight_factor(lw, probs)
    assert ((factor > 0) & (factor < 2)).all()
    g_v, g_lw = torch.autograd.grad(factor.square().sum(), (v, lw), allow_unused=True)
    assert g_v is None and g_lw.abs().sum() > 0
    with pytest.raises(ValueError, match="weight_logits .* and probs .* differ"):
        learned_weight_factor(lw[:, :8], probs)


pytest.importorskip("trimesh")
pytest.importorskip("moderngl")

from bpnp.pose.config import RenderSettings, TrainConfig  # noqa: E402
from bpnp.pose.study import spot_mesh  # noqa: E402
from bpnp.pose.synthesis import render_dataset  # noqa: E402
from bpnp.pose.train import read_log, train  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from bpnp.pose.render import Renderer, RenderUnavailableError

    try:
        Renderer(__import__("bpnp.pose.mesh", fromlist=["x"]).load_mesh(spot_mesh()), 8, 8).release()
    except RenderUnavailableError as exc:
        pytest.skip(f"no OpenGL here: {exc}")
    root = tmp_path_factory.mktemp("tiny")
    settings = RenderSettings(size=32, occluder_prob=0.0)
    render_dataset(spot_mesh(), root, 24, settings, seed=1, split="train")
    render_dataset(spot_mesh(), root, 8, settings, seed=2, split="test")
    return root


def _tiny(data, out, **kw):
    base = dict(
        data=str(data / "train"),
        out=str(out),
        steps=40,
        batch_size=8,
        size=32,
        width=8,
        lr=1e-2,
        log_every=4,
        checkpoint_every=8,
        workers=0,
        progress=False,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("variant", ["heatmap", "bpnp", "bpnp-add", "coord"])
def test_loss_falls_and_no_pnp_failure(tiny_data, tmp_path, variant):
    summary = train(_tiny(tiny_data, tmp_path, variant=variant, warmup_frac=0.5, augment=False))
    log = read_log(tmp_path / "log.csv")
    assert log["loss_heatmap"][-3:].mean() < 0.85 * log["loss_heatmap"][:2].mean()
    assert summary["nonfinite_steps"] == 0 and summary["pnp_failures"] == 0
    if variant == "heatmap":
        assert summary["beta"] is None and not log["loss_pose"].any()
    else:
        assert summary["beta"] > 0 and (log["loss_pose"][log["step"] > 20] > 0).all()
    for name in ("config.json", "model.pt", "checkpoint.pt", "loss.png", "train_summary.json"):
        assert (tmp_path / name).is_file(), name


def test_a_progress_bar_over_a_data_loader_starts_no_workers_of_its_own():
    import multiprocessing

    from bpnp.progress import progress

    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=None, num_workers=1)
    bar = progress(loader, total=4, disable=True)
    assert not multiprocessing.active_children()  # nothing until the loop asks
    assert list(bar) == [0, 1, 2, 3]
    assert not multiprocessing.active_children()


def test_training_leaves_no_data_worker_behind(tiny_data, tmp_path):
    # The worker processes end with the loop, not when a garbage collection finds them.
    import gc
    import multiprocessing

    gc.disable()
    try:
        train(_tiny(tiny_data, tmp_path, variant="heatmap", steps=8, workers=1))
        assert not multiprocessing.active_children()
    finally:
        gc.enable()


def _state(path):
    return torch.load(path, weights_only=False)["model"]


def test_resume_after_kill_equals_uninterrupted(tiny_data, tmp_path):
    full = tmp_path / "full"
    cfg = _tiny(tiny_data, full, variant="bpnp", steps=48, warmup_frac=0.25, workers=1)
    train(cfg)
    killed = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.json"
    TrainConfig(**{**cfg.__dict__, "out": str(killed)}).to_json(cfg_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bpnp.cli", "train", "--config", str(cfg_file), "--quiet"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.pt").is_file(), "the run finished before it could be killed"
    step = torch.load(killed / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < 48
    done = subprocess.run([sys.executable, "-m", "bpnp.cli", "train", "--resume", str(killed), "--quiet"], env=env)
    assert done.returncode == 0
    a, b = _state(full / "model.pt"), _state(killed / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(full / "log.csv")["loss"].tolist() == read_log(killed / "log.csv")["loss"].tolist()
    assert json.loads((killed / "train_summary.json").read_text())["resumed_from"] == step


def test_warm_start_from_a_heatmap_snapshot_equals_training_from_scratch(tiny_data, tmp_path):
    # The experiment trains a seed's warm-up once, in the heatmap run, and starts the pose variants
    # from its snapshot: that must give the very weights of a pose run trained from step 0.
    import shutil

    from bpnp.pose.evaluate import evaluate

    common = dict(steps=24, warmup_frac=0.5, augment=True)
    heat = train(_tiny(tiny_data, tmp_path / "heat", variant="heatmap", snapshot_steps=[12], **common))
    snapshot = tmp_path / "heat" / "checkpoint_step000012.pt"
    assert heat["pnp_failures"] == 0 and snapshot.is_file()
    # A snapshot is a model to evaluate like any other.
    assert evaluate(snapshot, tiny_data / "test", tmp_path / "eval", overlays=0)["kp_error_px_mean"] > 0
    scratch = tmp_path / "scratch"
    train(_tiny(tiny_data, scratch, variant="bpnp", **common))
    forked = tmp_path / "forked"
    summary = train(_tiny(tiny_data, forked, variant="bpnp", warm_start=str(snapshot), **common))
    assert summary["resumed_from"] == 12 and summary["beta"] > 0
    a, b = _state(scratch / "model.pt"), _state(forked / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The log holds the shared warm-up's rows (from the heatmap run), then its own.
    log_a, log_b = read_log(scratch / "log.csv"), read_log(forked / "log.csv")
    assert log_a["step"].tolist() == log_b["step"].tolist()
    assert log_a["loss"].tolist() == log_b["loss"].tolist()
    # A fixed beta holds from the snapshot on (the snapshot, taken in the warm-up, has none).
    fixed = train(_tiny(tiny_data, tmp_path / "fixed", variant="bpnp", warm_start=str(snapshot), beta=0.25, **common))
    assert fixed["beta"] == 0.25
    assert set(read_log(tmp_path / "fixed" / "log.csv")["beta"][-3:]) == {0.25}
    # Learned PnP weights: the same warm-up, then the pose loss also trains the confidences.
    learn = dict(variant="bpnp", warm_start=str(snapshot), beta=0.25, learn_weights=True)
    learned = train(_tiny(tiny_data, tmp_path / "learned", **learn, **common))
    assert learned["pnp_failures"] == 0 and learned["nonfinite_steps"] == 0
    c = _state(tmp_path / "learned" / "model.pt")
    d = _state(tmp_path / "fixed" / "model.pt")
    assert not all(torch.equal(c[k], d[k]) for k in c) and all(torch.isfinite(c[k]).all() for k in c)
    assert json.loads((tmp_path / "learned" / "config.json").read_text())["learn_weights"] is True
    # PnP weights from a head of their own: the same warm-up (no head in the snapshot), the head
    # trained by the pose loss alone, resumed from its own checkpoint to the same weights, and
    # evaluated with the weights it learned.
    head = dict(variant="bpnp", warm_start=str(snapshot), beta=0.25, weight_head=True, snapshot_steps=[18])
    headed = train(_tiny(tiny_data, tmp_path / "head", **head, **common))
    assert headed["pnp_failures"] == 0 and headed["nonfinite_steps"] == 0
    assert headed["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    e = _state(tmp_path / "head" / "model.pt")
    assert e["weight_head.weight"].abs().sum() > 0  # it started at zero
    assert not torch.equal(e["head.weight"], d["head.weight"])  # other weights, other pose steps
    again = tmp_path / "head-resumed"
    again.mkdir()
    shutil.copy(tmp_path / "head" / "checkpoint_step000018.pt", again / "checkpoint.pt")
    train(_tiny(tiny_data, again, **{**head, "snapshot_steps": []}, **common), resume=True)
    f = _state(again / "model.pt")
    assert all(torch.equal(e[k], f[k]) for k in e)
    scored = evaluate(tmp_path / "head" / "model.pt", tiny_data / "test", tmp_path / "eval-head", overlays=0)
    assert scored["pnp_weights"] == "confidence x learned" and scored["kp_error_px_mean"] > 0
    # A snapshot this run would not have reached by itself is refused, saying why.
    with pytest.raises(ValueError, match="other seed"):
        train(_tiny(tiny_data, tmp_path / "x", variant="bpnp", warm_start=str(snapshot), **{**common, "seed": 1}))
    with pytest.raises(ValueError, match="past the heatmap-only phase"):
        train(
            _tiny(
                tiny_data, tmp_path / "y", variant="bpnp", warm_start=str(snapshot), **{**common, "warmup_frac": 0.25}
            )
        )
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train(_tiny(tiny_data, tmp_path / "z", variant="bpnp", warm_start=str(tmp_path / "none.pt"), **common))
    with pytest.raises(ValueError, match="snapshot_steps"):
        _tiny(tiny_data, tmp_path, snapshot_steps=[100])


def test_experiment_shares_the_warm_up_and_continues_where_it_stopped(tmp_path):
    from bpnp.pose.study import Budget, PoseLossSetting, compare, summarise

    budget = Budget(train_count=16, test_count=8, steps=10, size=32, batch_size=8, width=8, workers=0)
    first = compare(spot_mesh(), tmp_path, ("heatmap", "bpnp"), (0,), budget, quiet=True)
    bpnp_run = first["runs"]["bpnp"][0]["train"]
    assert bpnp_run["resumed_from"] == 3 and bpnp_run["warm_start"].endswith("checkpoint_step000003.pt")
    assert first["runs"]["heatmap"][0]["metrics"]["kp_error_px_mean"] > 0
    # The same command again reads the finished runs back instead of training them anew.
    stamps = {v: (tmp_path / f"{v}_seed0" / "model.pt").stat().st_mtime_ns for v in ("heatmap", "bpnp")}
    again = compare(spot_mesh(), tmp_path, ("heatmap", "bpnp"), (0,), budget, quiet=True)
    assert stamps == {v: (tmp_path / f"{v}_seed0" / "model.pt").stat().st_mtime_ns for v in stamps}
    assert again["runs"]["bpnp"][0]["metrics"] == first["runs"]["bpnp"][0]["metrics"]
    # Another loss weight: runs of its own, beside the default ones, from the same warm-up.
    setting = PoseLossSetting(beta=0.5, learn_weights=True)
    fixed = compare(spot_mesh(), tmp_path, ("heatmap", "bpnp"), (0,), budget, quiet=True, setting=setting)
    assert fixed["folders"] == {"heatmap": "heatmap", "bpnp": "bpnp-beta0.5-learned-weights"}
    assert [row[0] for row in summarise(fixed)[0]] == ["heatmap", "bpnp-beta0.5-learned-weights"]
    assert stamps["heatmap"] == (tmp_path / "heatmap_seed0" / "model.pt").stat().st_mtime_ns
    run = fixed["runs"]["bpnp"][0]["train"]
    assert run["beta"] == 0.5 and run["warm_start"] == bpnp_run["warm_start"]
    config = json.loads((tmp_path / "bpnp-beta0.5-learned-weights_seed0" / "config.json").read_text())
    assert config["learn_weights"] is True and config["balance"] == 0.3
    assert (
        again["runs"]["bpnp"][0]["metrics"]
        == compare(spot_mesh(), tmp_path, ("heatmap", "bpnp"), (0,), budget, quiet=True)["runs"]["bpnp"][0]["metrics"]
    )
    assert PoseLossSetting(balance=0.1, learn_weights=True).folder("coord") == "coord-balance0.1"
    head = PoseLossSetting(beta=0.5, weight_head=True)
    assert head.folder("bpnp-add") == "bpnp-add-beta0.5-weight-head" and head.folder("heatmap") == "heatmap"
    assert head.options("bpnp-add") == {"beta": 0.5, "weight_head": True}
    assert head.describe() == "beta 0.5, PnP weights from a head of their own"
    with pytest.raises(ValueError, match="a run with other .*steps is there"):
        compare(spot_mesh(), tmp_path, ("heatmap",), (0,), Budget(**{**budget.__dict__, "steps": 12}), quiet=True)
    with pytest.raises(ValueError, match="keypoints chosen by 'fps', not 'distinctive'"):
        compare(spot_mesh(), tmp_path, ("heatmap",), (0,), budget, quiet=True, keypoints="distinctive")


def test_experiment_reports_only_the_seeds_that_have_finished(tmp_path):
    # An experiment spread over sessions: report what has finished, train and render nothing.
    import shutil

    from bpnp.pose.study import Budget, compare, run_experiment

    budget = Budget(train_count=16, test_count=8, steps=10, size=32, batch_size=8, width=8, workers=0)
    mesh_dir = tmp_path / "spot_triangulated"
    first = compare(spot_mesh(), mesh_dir, ("heatmap", "bpnp"), (0, 1), budget, quiet=True)
    assert first["seeds"] == [0, 1]
    # Seed 1's bpnp run stopped before its evaluation, seed 2 never started.
    shutil.rmtree(mesh_dir / "bpnp_seed1" / "eval")
    before = sorted(p.name for p in mesh_dir.iterdir())
    read = compare(spot_mesh(), mesh_dir, ("heatmap", "bpnp"), (0, 1, 2), budget, quiet=True, finished_only=True)
    assert read["seeds"] == [0] and sorted(read["runs"]["bpnp"]) == [0] and read["render_seconds"] is None
    assert read["runs"]["bpnp"][0]["metrics"] == first["runs"]["bpnp"][0]["metrics"]
    assert sorted(p.name for p in mesh_dir.iterdir()) == before  # nothing trained, nothing rendered
    assert not (mesh_dir / "bpnp_seed1" / "eval").exists()
    results = run_experiment(
        str(tmp_path), [str(spot_mesh())], [0, 1, 2], ("heatmap", "bpnp"), budget, quiet=True, finished_only=True
    )
    assert sorted(results["spot_triangulated"]) == ["bpnp", "heatmap"]
    assert results["spot_triangulated"]["bpnp"]["seeds"] == [0]
    assert json.loads((tmp_path / "metrics.json").read_text())["seeds"] == {"spot_triangulated": [0]}
    report = (tmp_path / "report.md").read_text()
    assert "Seeds [0]" in report and "only with it / only without" in report
    # A budget other than the runs' is refused, not mixed in.
    with pytest.raises(ValueError, match="a run with other .*steps is there"):
        compare(
            spot_mesh(), mesh_dir, ("heatmap",), (0,), Budget(**{**budget.__dict__, "steps": 12}), finished_only=True
        )
    # The heatmap runs alone (they saved the shared warm-up; that changes nothing else).
    alone = compare(spot_mesh(), mesh_dir, ("heatmap",), (0, 1), budget, quiet=True, finished_only=True)
    assert alone["seeds"] == [0, 1]
    # A report of another set of variants in the same folder has a name of its own, beside the first.
    kept_report = (tmp_path / "report.md").read_text()
    run_experiment(
        str(tmp_path), [str(spot_mesh())], [0, 1], ("heatmap",), budget, quiet=True, finished_only=True,
        report_name="heatmap-only",
    )  # fmt: skip
    named = json.loads((tmp_path / "metrics_heatmap-only.json").read_text())
    assert named["seeds"] == {"spot_triangulated": [0, 1]} and sorted(named["meshes"]["spot_triangulated"]) == [
        "heatmap"
    ]
    assert "spot_triangulated_heatmap-only_loss.png" in (tmp_path / "report_heatmap-only.md").read_text()
    assert (mesh_dir / "spot_triangulated_heatmap-only_loss.png").is_file()
    assert (mesh_dir / "spot_triangulated_heatmap-only_depth.png").is_file()  # the signed depth errors
    assert (tmp_path / "report.md").read_text() == kept_report
    with pytest.raises(ValueError, match="report_name"):
        run_experiment(
            str(tmp_path), [str(spot_mesh())], [0], ("heatmap",), budget, finished_only=True, report_name="a/b"
        )
    # A mesh with no finished seed is named in the report and left out of the metrics.
    shutil.rmtree(mesh_dir / "heatmap_seed0" / "eval")
    none = run_experiment(
        str(tmp_path), [str(spot_mesh())], [0], ("heatmap", "bpnp"), budget, quiet=True, finished_only=True
    )
    assert none == {}
    assert "No seed of [0] has finished" in (tmp_path / "report.md").read_text()


def test_the_quick_demo_compares_heatmap_only_with_the_bpnp_add_loss(tmp_path):
    from bpnp.pose.study import Budget, run

    budget = Budget(train_count=16, test_count=8, steps=10, size=32, batch_size=8, width=8, workers=0)
    metrics = run(out=str(tmp_path), quiet=True, budget=budget)
    assert sorted(metrics["variants"]) == ["bpnp-add", "heatmap"]
    assert metrics["variants"]["bpnp-add"]["pnp_failures_train"] == 0
    assert len(metrics["acceptance"]) == 2 and all(isinstance(ok, bool) for ok in metrics["acceptance"].values())
    report = (tmp_path / "report.md").read_text()
    assert "bpnp-add" in report and "Acceptance:" in report
    assert json.loads((tmp_path / "metrics.json").read_text())["budget"]["steps"] == 10


def test_per_seed_rows_count_the_images_each_variant_alone_passes():
    from bpnp.pose.study import SEED_HEADER, per_seed_rows

    def run(passes, proj, depth, beta):
        n = len(passes)
        per = {
            "depth_error_mm": np.full(n, depth),
            "depth_signed_error_mm": np.full(n, depth - 1.0),
            "lateral_error_mm": np.full(n, 0.5),
            "add_or_adds_0.1d": np.array(passes, dtype=bool),
            "proj2d_5px": np.array(proj, dtype=bool),
            "proj2d_px": np.where(proj, 2.0, 8.0),
            "add_mm": np.where(passes, 4.0, 12.0),
            "adds_mm": np.full(n, 1.0),  # not the error of an object without symmetry
            "kp_error_px": np.full(n, 2.0),
            "5cm5deg": np.zeros(n, dtype=bool),
        }
        metrics = {
            "kp_error_px_mean": 2.0,
            "proj2d_5px": float(np.mean(proj)),
            "add_or_adds_0.1d": float(np.mean(passes)),
            "5cm5deg": 0.0,
            "rotation_error_deg_median": 1.5,
        }
        return {"per_image": per, "metrics": metrics, "train": {"beta": beta}}

    result = {
        "runs": {
            "heatmap": {3: run([1, 1, 0, 0, 1], [1, 1, 1, 1, 1], 4.0, None)},
            "bpnp": {3: run([1, 0, 1, 1, 1], [1, 1, 1, 1, 0], 3.5, 0.008)},
        }
    }
    rows = per_seed_rows(result)
    assert [r[:2] for r in rows] == [[3, "heatmap"], [3, "bpnp"]] and all(len(r) == len(SEED_HEADER) for r in rows)
    heatmap, bpnp = (dict(zip(SEED_HEADER, row, strict=True)) for row in rows)
    only, beta = "ADD(-S)-0.1d only with it / only without", "beta"
    assert heatmap["ADD(-S)-0.1d"] == "60.0%" and heatmap[only] == "" and heatmap[beta] == ""
    assert heatmap["ADD(-S) error (mm)"] == "7.20" and heatmap["2D projection error (px)"] == "2.00"
    # Two images pass only with bpnp (2 and 3), one only without (1): +20 points, -1.6 mm.
    assert bpnp["ADD(-S)-0.1d"].startswith("80.0% (+20.0 [") and bpnp[only] == "2 / 1"
    assert bpnp["ADD(-S) error (mm)"].startswith("5.60 (-1.60 [")
    assert bpnp["2D projection < 5 px"].startswith("80.0% (-20.0 [")
    assert bpnp["2D projection error (px)"].startswith("3.20 (+1.20 [")
    assert bpnp["depth error (mm)"].startswith("3.50 (-0.50 [") and bpnp[beta] == "0.008"
    assert heatmap["depth error (mm)"] == "4.00" and bpnp["lateral error (mm)"].startswith("0.50 (+0.00 [")
    bias = "depth bias (mm, > 0: too far)"
    assert heatmap[bias] == "3.00" and bpnp[bias].startswith("2.50 (-0.50 [")
    # A record evaluated before the split has no depth cell, for any variant of that seed.
    del result["runs"]["heatmap"][3]["per_image"]["depth_error_mm"]
    rows = per_seed_rows(result)
    assert [dict(zip(SEED_HEADER, r, strict=True))["depth error (mm)"] for r in rows] == ["", ""]
    assert dict(zip(SEED_HEADER, rows[1], strict=True))["lateral error (mm)"].startswith("0.50 (+0.00 [")


def test_a_kept_record_of_an_experiment_reports_and_continues_like_the_runs(tmp_path):
    # What the repository keeps of the longer experiment: the runs' records moved to another
    # folder, without weights, checkpoints or renders.
    import shutil

    from bpnp.pose.study import Budget, compare

    budget = Budget(train_count=16, test_count=8, steps=10, size=32, batch_size=8, width=8, workers=0)
    made = compare(spot_mesh(), tmp_path / "a" / "spot", ("heatmap", "bpnp"), (0,), budget, quiet=True)
    kept = tmp_path / "b" / "spot"
    shutil.copytree(tmp_path / "a" / "spot", kept, ignore=shutil.ignore_patterns("*.pt", "data"))
    shutil.rmtree(tmp_path / "a")
    assert not list(kept.rglob("*.pt")) and not (kept / "data").exists()
    read = compare(spot_mesh(), kept, ("heatmap", "bpnp"), (0,), budget, quiet=True, finished_only=True)
    assert read["seeds"] == [0]
    for variant in ("heatmap", "bpnp"):
        assert read["runs"][variant][0]["metrics"] == made["runs"][variant][0]["metrics"]
        assert read["runs"][variant][0]["train"] == made["runs"][variant][0]["train"]
    # Continuing the experiment there trains only the seed it lacks.
    more = compare(spot_mesh(), kept, ("heatmap", "bpnp"), (0, 1), budget, quiet=True)
    assert more["seeds"] == [0, 1]
    assert more["runs"]["bpnp"][0]["metrics"] == made["runs"]["bpnp"][0]["metrics"]
    assert not (kept / "bpnp_seed0" / "model.pt").exists() and (kept / "bpnp_seed1" / "model.pt").is_file()
    # A record of another place inside the mesh folder is not this experiment's run.
    record = kept / "bpnp_seed0" / "config.json"
    record.write_text(record.read_text().replace("data/test", "data/other"))
    with pytest.raises(ValueError, match="a run with other test_data is there"):
        compare(spot_mesh(), kept, ("heatmap", "bpnp"), (0,), budget, quiet=True, finished_only=True)


@pytest.mark.parametrize("weight_head", [False, True])
def test_ddp_two_ranks_hold_identical_weights(tiny_data, tmp_path, weight_head):
    # With a weight head the first step is heatmap-only, where the head has no gradient: DDP must
    # take that, and the ranks must still agree, the head included.
    steps, warmup = (3, 0.34) if weight_head else (2, 0.0)
    script = tmp_path / "ddp.py"
    script.write_text(
        "import os, sys, torch\n"
        "from bpnp.pose.config import TrainConfig\nfrom bpnp.pose.train import train\n"
        f"cfg = TrainConfig(data=sys.argv[1], out=sys.argv[2], steps={steps}, batch_size=8, size=32, width=8,\n"
        "                  log_every=1, checkpoint_every=1, workers=0, progress=False, threads=1, variant='bpnp',\n"
        f"                  warmup_frac={warmup}, weight_head={weight_head})\n"
        "net = train(cfg)['model']\n"
        "torch.save(net.state_dict(), os.path.join(sys.argv[2], f\"rank{os.environ['RANK']}.pt\"))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BPNP_DDP_BACKEND": "gloo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = tmp_path / "run"
    done = subprocess.run(
        cmd + [str(script), str(tiny_data / "train"), str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    torch.manual_seed(0)  # the run's seed: its initial weights
    start = KeypointHeatmapNet(9, 8, weight_head).state_dict()
    assert all(torch.equal(r0[k], r1[k]) for k in r0 if "running" not in k and "num_batches" not in k)
    assert any(not torch.equal(r0[k], start[k]) for k in r0 if k.endswith("weight"))  # a step was taken
    if weight_head:
        assert not torch.equal(r0["weight_head.weight"], start["weight_head.weight"])
    assert json.loads((out / "train_summary.json").read_text())["world_size"] == 2


def test_cli_train_under_torchrun(tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BPNP_DDP_BACKEND": "gloo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bpnp.cli"]
    args = ["train", "--data", str(tiny_data / "train"), "--test-data", str(tiny_data / "test"), "--steps", "2"]
    args += ["--batch-size", "8", "--size", "32", "--workers", "0", "--out", str(tmp_path / "run"), "--quiet"]
    done = subprocess.run(cmd + args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["world_size"] == 2
    assert json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["images"] == 8


def test_evaluate_writes_metrics_bop_csv_and_overlays(tiny_data, tmp_path):
    import cv2

    from bpnp.pose import bop
    from bpnp.pose.evaluate import evaluate

    train(_tiny(tiny_data, tmp_path / "run", variant="bpnp", steps=8, warmup_frac=0.5))
    metrics = evaluate(tmp_path / "run" / "model.pt", tiny_data / "test", tmp_path / "eval")
    assert metrics["images"] == 8
    # the crop margin that frames objects as the training renders did travels in the checkpoint
    from bpnp.pose.data import crop_margin_for

    stored = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["crop_margin"]
    assert stored == metrics["crop_margin"] == crop_margin_for(tiny_data / "train")
    # ... and so does the model's hull: at the true pose its projection spans the rendered box
    from bpnp.pose.predict import PosePredictor, Prediction

    predictor = PosePredictor(tmp_path / "run" / "model.pt")
    assert 4 <= len(predictor.outline3d) < 2000
    gt = bop.read_scene(tiny_data / "test" / "000000")
    for a in gt:
        pose = np.concatenate([cv2.Rodrigues(a.R)[0].ravel(), a.t])
        box = predictor._object_box(Prediction(pose, np.zeros((9, 2)), 1.0, True, (0, 0, 1, 1)), a.K, None)
        assert np.abs(np.subtract(box, a.bbox_obj)).max() <= 2.5  # the render's box: whole pixels
    for key in ("kp_error_px_mean", "proj2d_5px", "add_0.1d", "adds_0.1d", "5cm5deg", "add_auc_10cm", "pnp_converged"):
        assert np.isfinite(metrics[key]), key
    rows = bop.read_results_csv(tmp_path / "eval" / "predictions.csv")
    assert len(rows) == 8 and all(np.allclose(r["R"] @ r["R"].T, np.eye(3), atol=1e-6) for r in rows)
    per = np.load(tmp_path / "eval" / "per_image.npz")
    assert per["add_mm"].shape == (8,) and per["ids"].shape == (8, 3)
    each = metrics["kp_error_px_per_keypoint"]
    assert len(each) == 9 and np.mean(each) == pytest.approx(metrics["kp_error_px_mean"], abs=1e-2)
    assert np.allclose(per["kp_error_px_each"].mean(-1), per["kp_error_px"])
    codes = per["kp_visibility"]
    assert codes.shape == (8, 9) and np.all(codes[:, -1] == 4)  # the centre: inside the object
    assert metrics["kp_hidden_fraction"] == pytest.approx(float((codes == 1).mean()), abs=1e-4)
    seen = per["kp_error_px_each"][codes == 0]
    assert metrics["kp_error_px_visible"] == pytest.approx(float(seen.mean()), abs=1e-3)
    assert metrics["kp_unseen_fraction_per_keypoint"][-1] == 1.0
    assert (tmp_path / "eval" / "overlays.png").stat().st_size > 0
    assert (tmp_path / "eval" / "report.md").read_text().startswith("# Evaluation")


def test_predictor_on_given_boxes_equals_evaluate_and_the_cli_writes_csv_json_overlays(tiny_data, tmp_path):
    import json

    import cv2

    from bpnp.cli import main
    from bpnp.pose import bop
    from bpnp.pose.data import load_split
    from bpnp.pose.evaluate import evaluate
    from bpnp.pose.predict import PosePredictor

    train(_tiny(tiny_data, tmp_path / "run", variant="bpnp", steps=8, warmup_frac=0.5))
    model = tmp_path / "run" / "model.pt"
    evaluate(model, tiny_data / "test", tmp_path / "eval", visibility=False, overlays=0)
    ref = bop.read_results_csv(tmp_path / "eval" / "predictions.csv")
    data = load_split(tiny_data / "test", size=32, cache=False)
    # the renders are the network's size: a box of the whole image with no margin is evaluate's crop
    found = PosePredictor(model, margin=0.0)(list(data.images), data.K, [(0, 0, 32, 32)] * len(data))
    for r, p in zip(ref, found):
        assert np.allclose(r["t"], p.pose[3:], rtol=1e-5, atol=1e-4)
    # the command: whole images, a camera JSON, overlays; every image in the JSON
    paths = []
    for j, img in enumerate(data.images):
        paths.append(str(tmp_path / f"img{j}.png"))
        cv2.imwrite(paths[-1], img[..., ::-1])
    camera = tmp_path / "K.json"
    camera.write_text(json.dumps({"K": data.K[0].tolist()}))
    out = tmp_path / "pred" / "poses.csv"
    argv = ["predict", "--checkpoint", str(model), "--images", *paths, "--camera", str(camera), "--out", str(out)]
    assert main([*argv, "--overlays", str(tmp_path / "over"), "--quiet"]) == 0
    records = json.loads(out.with_suffix(".json").read_text())
    assert len(records) == len(paths) and len(bop.read_results_csv(out)) == sum(r["converged"] for r in records)
    assert len(list((tmp_path / "over").glob("*_pose.jpg"))) == len(paths)


def test_a_pose_that_did_not_converge_is_left_out_of_the_csv_and_said(tmp_path):
    import json

    from bpnp.pose import bop
    from bpnp.pose.predict import Prediction, write_predictions

    pose = np.array([0.1, 0.2, 0.3, 1.0, 2.0, 300.0])
    found = [
        Prediction(pose, np.zeros((4, 2)), 0.5, True, (0, 0, 9, 9)),
        Prediction(pose, np.zeros((4, 2)), 0.1, False, (0, 0, 9, 9)),
    ]
    assert write_predictions(tmp_path / "p.csv", ["a.jpg", "b.jpg"], found, obj_id=3) == 1
    rows = bop.read_results_csv(tmp_path / "p.csv")
    assert [r["im_id"] for r in rows] == [0] and rows[0]["obj_id"] == 3
    assert [r["converged"] for r in json.loads((tmp_path / "p.json").read_text())] == [True, False]


def test_score_predictions_reproduces_evaluate_and_counts_a_missing_row_as_wrong(tiny_data, tmp_path):
    from bpnp.cli import main
    from bpnp.metrics import auc
    from bpnp.pose import bop
    from bpnp.pose.evaluate import evaluate, score_predictions

    train(_tiny(tiny_data, tmp_path / "run", variant="heatmap", steps=8))
    metrics = evaluate(tmp_path / "run" / "model.pt", tiny_data / "test", tmp_path / "eval", overlays=0)
    evaluated = np.load(tmp_path / "eval" / "per_image.npz")
    summary, per = score_predictions(tmp_path / "eval" / "predictions.csv", tiny_data / "test", tmp_path / "score")
    assert np.array_equal(per["ids"], evaluated["ids"]) and per["predicted"].all()
    for key in ("add_mm", "adds_mm", "proj2d_px", "rotation_error_deg", "depth_error_mm", "lateral_error_mm"):
        assert np.allclose(per[key], evaluated[key], atol=1e-4), key  # the CSV's 6-8 digits
    for key in ("add_0.1d", "proj2d_5px", "5cm5deg"):
        assert np.array_equal(per[key], evaluated[key]), key
    for key in ("proj2d_5px", "add_or_adds_0.1d", "add_auc_10cm", "depth_error_mm_mean", "translation_error_mm_median"):
        assert summary[key] == pytest.approx(metrics[key], abs=1e-4), key
    assert summary["rows_unused"] == 0
    assert json.loads((tmp_path / "score" / "metrics.json").read_text()) == summary
    assert np.array_equal(np.load(tmp_path / "score" / "per_image.npz")["add_mm"], per["add_mm"])

    # First image unpredicted; a lower-scored duplicate of the second and a row of no image: unused.
    rows = bop.read_results_csv(tmp_path / "eval" / "predictions.csv")
    wrong = {**rows[1], "score": rows[1]["score"] - 1, "t": rows[1]["t"] + 500.0}
    elsewhere = {**rows[2], "im_id": 999}
    bop.write_results_csv(tmp_path / "partial.csv", rows[1:] + [wrong, elsewhere])
    partial, per2 = score_predictions(tmp_path / "partial.csv", tiny_data / "test")
    assert partial["predicted"] == 7 / 8 and partial["rows_unused"] == 2
    assert np.isnan(per2["add_mm"][0]) and not per2["add_0.1d"][0] and not per2["proj2d_5px"][0]
    assert np.allclose(per2["add_mm"][1:], per["add_mm"][1:])
    assert partial["add_0.1d"] == pytest.approx(per["add_0.1d"][1:].sum() / 8)
    missing_is_infinite = torch.from_numpy(np.r_[np.inf, per["add_mm"][1:]])
    assert partial["add_auc_10cm"] == pytest.approx(auc(missing_is_infinite, 100.0))

    bop.write_results_csv(tmp_path / "empty.csv", [])
    empty, _ = score_predictions(tmp_path / "empty.csv", tiny_data / "test")
    assert empty["predicted"] == 0 and empty["add_0.1d"] == 0 and empty["add_auc_10cm"] == 0
    assert np.isnan(empty["depth_error_mm_mean"]) and np.isnan(empty["proj2d_px_median"])

    (tmp_path / "bad.csv").write_text("scene_id,im_id,obj_id,score,R,t,time\n0,0,1,0.5,1 0 0,0 0 100\n")
    with pytest.raises(ValueError, match="not a BOP result CSV"):
        score_predictions(tmp_path / "bad.csv", tiny_data / "test")
    with pytest.raises(ValueError, match="no instance of obj_id 7"):
        score_predictions(tmp_path / "partial.csv", tiny_data / "test", obj_id=7)
    with pytest.raises(FileNotFoundError, match="no BOP scene"):
        score_predictions(tmp_path / "partial.csv", tmp_path)
    assert (
        main(["score", "--predictions", str(tmp_path / "partial.csv"), "--data", str(tiny_data / "test"), "--quiet"])
        == 0
    )
    assert (tmp_path / "score" / "report.md").read_text().startswith(f"# Scores of {tmp_path / 'partial.csv'}")
    assert main(["score", "--predictions", str(tmp_path / "none.csv"), "--data", str(tiny_data / "test")]) == 2


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        TrainConfig(variant="magic")
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainConfig(size=100)
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(log_every=10, checkpoint_every=15)
    with pytest.raises(ValueError, match="learn_weights: needs .* got variant 'heatmap'"):
        TrainConfig(variant="heatmap", learn_weights=True)
    with pytest.raises(ValueError, match="learn_weights: needs .*confidence_weights False"):
        TrainConfig(variant="bpnp-add", confidence_weights=False, learn_weights=True)
    with pytest.raises(ValueError, match="weight_head: needs .* got variant 'coord'"):
        TrainConfig(variant="coord", weight_head=True)
    with pytest.raises(ValueError, match="weight_head and learn_weights: choose one"):
        TrainConfig(variant="bpnp-add", weight_head=True, learn_weights=True)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 5, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown config keys \\['colour'\\]"):
        TrainConfig.from_json(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["render", "--mesh", "nope.obj", "--count", "2", "--out", "{tmp}"], "no such file"),
        (["render", "--mesh", "{mesh}", "--count", "2", "--size", "50", "--out", "{tmp}"], "multiple of 16"),
        (
            ["render", "--mesh", "{mesh}", "--count", "2", "--lens-field", "5", "--out", "{tmp}/r"],
            "--lens-field: expected",
        ),
        (
            ["render", "--mesh", "{mesh}", "--count", "2", "--occluders", "1.5", "--out", "{tmp}/r"],
            "--occluders: expected",
        ),
        (
            ["render", "--mesh", "{mesh}", "--count", "2", "--keypoint-method", "distinctive", "--out", "{tmp}"],
            "--symmetric",
        ),
        (["train", "--data", "{tmp}/missing"], "no such folder"),
        (["train"], "give --data"),
        (["train", "--resume", "{tmp}"], "no config.json"),
        (["train", "--data", "{tmp}", "--warm-start", "{tmp}/none.pt"], "no such checkpoint"),
        (["evaluate", "--checkpoint", "none.pt", "--data", "{tmp}"], "no such file"),
    ],
)
def test_cli_mistakes_are_one_line(tmp_path, capsys, args, message):
    from bpnp.cli import main

    args = [a.format(tmp=tmp_path, mesh=spot_mesh()) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flag", ["--learn-weights", "--weight-head"])
def test_cli_refuses_learned_pnp_weights_without_pnp_in_one_line(tmp_path, capsys, flag):
    from bpnp.cli import main

    # A usage mistake, whichever check finds it: exit 2, one line naming the option.
    assert main(["train", "--data", str(tmp_path), "--variant", "heatmap", flag]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag}: needs confidence_weights" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "option, value, message",
    [("--beta", "-1", "expected a finite number >= 0"), ("--balance", "0", "expected a finite positive number")],
)
@pytest.mark.parametrize("command", ["train", "experiment"])
def test_cli_rejects_a_bad_loss_weight(tmp_path, capsys, command, option, value, message):
    from bpnp.cli import main

    out = tmp_path / "out"
    assert main([command, "--out", str(out), option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{option}: {message}" in err and len(err.splitlines()) == 1
    assert not out.exists()  # refused before any folder is made


def test_cli_render_train_evaluate(tmp_path, capsys, monkeypatch):
    from bpnp.cli import main

    data = tmp_path / "data"
    assert (
        main(["render", "--mesh", str(spot_mesh()), "--count", "6", "--size", "32", "--out", str(data), "--quiet"]) == 0
    )
    assert (
        main(
            [
                "render",
                "--mesh",
                str(spot_mesh()),
                "--count",
                "4",
                "--size",
                "32",
                "--out",
                str(data),
                "--split",
                "test",
                "--seed",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(data / "train"),
        "--test-data",
        str(data / "test"),
        "--steps",
        "3",
        "--batch-size",
        "4",
    ]
    options = ["--size", "32", "--workers", "0", "--balance", "0.1", "--learn-weights"]
    assert main(args + options + ["--out", str(run), "--quiet"]) == 0
    assert json.loads((run / "eval" / "metrics.json").read_text())["images"] == 4
    config = json.loads((run / "config.json").read_text())
    assert config["balance"] == 0.1 and config["learn_weights"] is True
    assert (
        main(
            ["evaluate", "--checkpoint", str(run / "model.pt"), "--data", str(data / "test"), "--limit", "2", "--quiet"]
        )
        == 0
    )
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["pnp_weights"] == "confidence" and "kp_hidden_fraction" in metrics
    plain = ["evaluate", "--checkpoint", str(run / "model.pt"), "--data", str(data / "test")]
    assert main(plain + ["--out", str(tmp_path / "e"), "--unweighted", "--no-visibility", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["pnp_weights"] == "none" and "kp_hidden_fraction" not in metrics
    import bpnp.pose.evaluate as evaluation

    seen, solve = [], evaluation.solve_pnp
    monkeypatch.setattr(evaluation, "solve_pnp", lambda *a, **kw: seen.append(kw) or solve(*a, **kw))
    robust = ["--out", str(tmp_path / "r"), "--pnp-loss", "huber", "--ransac", "--no-visibility", "--quiet"]
    assert main(plain + robust) == 0
    assert seen and all(kw["loss"] == "huber" and kw["ransac"] is True for kw in seen)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["pnp_loss"] == "huber" and metrics["pnp_ransac"] is True and metrics["images"] == 4
    assert Path(run / "config.json").is_file()


def test_library_never_imports_the_applications():
    # The library (core and the object-pose tool's modules) never loads the paper's experiments,
    # the studies that orchestrate the tool, the calibration tool or the reports.
    code = (
        "import sys, bpnp, bpnp.losses, bpnp.pose.model, bpnp.pose.train, bpnp.pose.evaluate, bpnp.pose.data, "
        "bpnp.pose.bop, bpnp.pose.mesh, bpnp.pose.render, bpnp.pose.predict; "
        "apps = ('bpnp.paper', 'bpnp.pose.study', 'bpnp.pose.board_study', 'bpnp.calibration', 'bpnp.reporting'); "
        "print(sorted(m for m in sys.modules if m.startswith(apps)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
