"""k-fold cross-validation of the epoch count with real training of the tiny model: the
result holds real per-epoch held-out losses and cleans up after itself; data the model can
only memorise stops early while learnable data trains longer; under torchrun with DeepSpeed
ZeRO-3 every rank runs the same folds and the main run afterwards loads its model as usual.

The memorise/learn contrast uses what the 2-layer test model can and cannot do within a few
epochs: it cannot copy a number from the prompt nor memorise a per-row answer, so
`tinymodel.rows` (a unique number per row) can only be fitted on the training rows' numbers,
which the held-out rows never use (held-out loss rises after epoch 2 at this learning rate);
rows whose answers come from a small shared set are learnable (held-out loss keeps falling).
`tinymodel.random_rows` is not used: its words are spelled letter by letter, and learning
to spell the ten words generalises, so its held-out loss keeps falling for 10+ epochs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.tinymodel import rows
from tests.trainer.conftest import MakeRun, Run

pytestmark = pytest.mark.trainer

#: Full fine-tuning with a high, constant learning rate: overfits quickly where it can.
FAST = {
    "learningRate": 0.01,
    "microBatchSize": 4,
    "gradientAccumulationSteps": 1,
    "warmupSteps": 0,
    "lrScheduler": "constant",
}


def _config(run: Run) -> Any:
    from kubetune.trainer.config import load_config

    return load_config(Path(run.command[-1].split("=", 1)[1]), env=run.env)


def _jsonl(data: list[dict[str, str]]) -> str:
    return "\n".join(json.dumps(r) for r in data)


def shared_answer_rows(n: int) -> list[dict[str, str]]:
    """Templated rows whose answers come from four values: held-out answers are seen."""
    return [
        {"prompt": f"Define term {i}: ", "completion": f"Term {i % 4} means item {i % 4}."}
        for i in range(n)
    ]


def _cross_validate(run: Run, work_dir: Path, folds: int, max_epochs: int) -> dict[str, Any]:
    from kubetune.trainer.remedies.kfold import cross_validate_epochs

    return cross_validate_epochs(
        _config(run), folds=folds, max_epochs=max_epochs, work_dir=work_dir
    )


def test_folds_give_real_per_epoch_held_out_losses_and_leave_nothing_behind(
    make_run: MakeRun, tmp_path: Path
) -> None:
    run = make_run(method="Full", rows=40, hp=FAST)
    work = tmp_path / "kfold"
    work.mkdir()
    (work / "keep.txt").write_text("not ours")
    result = _cross_validate(run, work, folds=3, max_epochs=3)

    assert set(result) == {"folds", "maxEpochs", "curves", "meanCurve", "epochs", "seconds"}
    assert result["folds"] == 3
    assert result["maxEpochs"] == 3
    curves = result["curves"]
    assert len(curves) == 3
    assert all(len(c) == 3 for c in curves)
    assert all(math.isfinite(x) and 0 < x < 20 for c in curves for x in c)
    assert len({tuple(c) for c in curves}) == 3, "each fold holds out other rows"
    assert all(c[0] != c[1] for c in curves), "the model trains between evaluations"
    mean = result["meanCurve"]
    assert mean == pytest.approx([sum(c[e] for c in curves) / 3 for e in range(3)], abs=1e-5)
    assert result["epochs"] == 1 + min(range(3), key=lambda e: (mean[e], e))
    assert result["seconds"] > 0
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]

    # Fresh inputs per fold and a fixed seed: the same config gives the same curves, and a
    # work directory the folds created is removed.
    again = _cross_validate(run, tmp_path / "created", folds=3, max_epochs=3)
    flat = [x for c in curves for x in c]
    assert [x for c in again["curves"] for x in c] == pytest.approx(flat, abs=1e-4)
    assert not (tmp_path / "created").exists()


def test_k_is_clamped_to_the_training_rows(make_run: MakeRun, tmp_path: Path) -> None:
    # 4 rows: the 10% validation split keeps one, three are left to fold.
    run = make_run(method="Full", rows=4, hp=FAST)
    result = _cross_validate(run, tmp_path / "kfold", folds=10, max_epochs=2)
    assert result["folds"] == 3
    assert len(result["curves"]) == 3
    assert all(len(c) == 2 for c in result["curves"])


def test_memorised_data_stops_early_and_learnable_data_trains_longer(
    make_run: MakeRun, tmp_path: Path
) -> None:
    memorise = _cross_validate(
        make_run(method="Full", data=_jsonl(rows(40)), hp=FAST), tmp_path / "a", 3, 6
    )
    learn = _cross_validate(
        make_run(method="Full", data=_jsonl(shared_answer_rows(40)), hp=FAST),
        tmp_path / "b",
        3,
        6,
    )
    mm, lm = memorise["meanCurve"], learn["meanCurve"]
    assert memorise["epochs"] <= 3, f"memorised data should stop early: {mm}"
    assert mm[-1] > min(mm) * 1.1, f"held-out loss should rise on memorised data: {mm}"
    assert learn["epochs"] >= 5, f"learnable data should train longer: {lm}"
    assert learn["epochs"] > memorise["epochs"]


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    from kubetune.trainer.remedies.kfold import cross_validate_epochs
    from kubetune.trainer.config import load_config
    from kubetune.trainer.setup import load_inputs, training_arguments

    cfg = load_config(Path(sys.argv[1]))
    result = cross_validate_epochs(cfg, folds=2, max_epochs=2, work_dir=Path(sys.argv[2]))

    # The main run afterwards: its model loads outside zero.Init as without the folds.
    from transformers import Trainer
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from kubetune.trainer.data import Collator

    result["zero3AtLoad"] = is_deepspeed_zero3_enabled()
    inputs = load_inputs(cfg)
    args = training_arguments(
        cfg, Path(sys.argv[2]) / "main", has_eval=False, cuda=False, bf16=False, main_proc=False
    )
    args.num_train_epochs = 1.0
    args.save_strategy = "no"
    trainer = Trainer(
        model=inputs.model,
        args=args,
        train_dataset=inputs.train_ds,
        data_collator=Collator(pad_id=int(inputs.tokenizer.pad_token_id)),
    )
    result["mainLoss"] = trainer.train().training_loss
    Path(sys.argv[3], f"rank-{os.environ['RANK']}.json").write_text(json.dumps(result))
    """
)


def test_every_rank_runs_the_same_folds_under_deepspeed_zero3(
    make_run: MakeRun, tmp_path: Path
) -> None:
    run = make_run(method="Full", zero=3, nproc=2, rows=24, hp={**FAST, "learningRate": 0.003})
    assert int(run.plan["zeroStage"]) == 3
    script = tmp_path / "cv.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    config_dir = run.command[-1].split("=", 1)[1]
    results = tmp_path / "results"
    results.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(script),
        config_dir,
        str(tmp_path / "kfold"),
        str(results),
    ]
    proc = subprocess.run(cmd, env=run.env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((results / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["folds"] == 2
        assert r["maxEpochs"] == 2
        assert all(math.isfinite(x) for c in r["curves"] for x in c)
        assert r["zero3AtLoad"] is False
        assert math.isfinite(r["mainLoss"])
    assert ranks[0]["curves"] == ranks[1]["curves"]
    assert ranks[0]["epochs"] == ranks[1]["epochs"]
    assert not (tmp_path / "kfold" / "fold-0").exists()
    assert not (tmp_path / "kfold" / "fold-1").exists()
