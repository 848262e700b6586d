"""The benchmark script: its table is consistent; the numbers themselves are measured, not tested."""
import json

from osteo import bench


def test_bench_runs_and_its_ratios_are_consistent(tmp_path, capsys):
    rep = bench.run(image_size=32, batch_size=4, steps=1, warmup=1, device="cpu", out_dir=tmp_path,
                    engines=("eager", "grouped"), twins=2)
    saved = json.loads((tmp_path / "throughput-cpu-32px.json").read_text())
    assert saved["rows"].keys() == rep["rows"].keys()
    names = list(rep["rows"])
    assert names[:4] == ["anchor (2x ResNet18)", "resnet18", "twin train [eager]", "twin train [grouped]"]
    anchor = rep["rows"]["anchor (2x ResNet18)"]["images_per_s"]
    for r in rep["rows"].values():
        assert r["images_per_s"] > 0 and abs(r["ratio_to_anchor"] - r["images_per_s"] / anchor) < 1e-9
    two = rep["rows"]["2 twins as one network [grouped]"]  # counts the slices of both runs
    assert abs(two["images_per_s"] - 2 * 4 / two["seconds_per_step"]) < 1e-6
    seq, bat = rep["rows"]["2 twin runs one after the other [auto]"], rep["rows"]["2 twin runs batched [osteo.batched]"]
    br = rep["batched_runs"]
    assert br["runs"] == 2 and abs(br["batched_over_sequential"] - bat["images_per_s"] / seq["images_per_s"]) < 1e-9
    assert abs(br["images_per_s_per_run_batched"] - bat["images_per_s"] / 2) < 1e-9
    assert abs(seq["images_per_s"] - 2 * 4 / seq["seconds_per_step"]) < 1e-6
    best = rep["rows"][f"twin train [{rep['best_twin_engine']}]"]["images_per_s"]
    assert best == max(rep["rows"][f"twin train [{e}]"]["images_per_s"] for e in ("eager", "grouped"))
    assert abs(rep["paper_epoch_seconds"] - 3600 / best) < 1e-6
    warm = rep["rows"][f"twin train [{rep['best_twin_engine']}]"]["warmup_s"]
    assert abs(rep["paper_run_60_epochs_with_warmup_seconds"] - (60 * 3600 / best + warm)) < 1e-6
    assert rep["device"].startswith("cpu") and rep["torch"] and rep["batch_size"] == 4
    out = capsys.readouterr().out
    assert "twin train [grouped]" in out and "60 epochs" in out and "2 twin runs batched / one after the other" in out


def test_cli_passes_options_to_bench(monkeypatch):
    from osteo import cli

    seen = {}
    monkeypatch.setattr(bench, "run", lambda *a, **k: seen.update(args=a))
    assert cli.main(["bench", "--image-size", "48", "--engines", "grouped", "--loop-check"]) == 0
    image_size, batch, *_ = seen["args"]
    assert image_size == 48 and batch == 128
    assert seen["args"][7] == ["grouped"] and seen["args"][8] is True and seen["args"][10] == 5
