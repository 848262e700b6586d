"""osteo.plots: every function returns a Figure whose axes hold the data it was given."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from osteo import plots

LABELS = ("normal", "osteopenia", "osteoporosis")


def _bars(ax):
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def _heights(container):
    return np.array([p.get_height() for p in container.patches])


def test_show_slices_windows_each_slice_with_eq1():
    hu = [np.full((8, 8), 200.0), np.linspace(-1000, 1500, 64).reshape(8, 8)]
    fig = plots.show_slices(hu, titles=["normal #1", "osteoporosis #1"])
    assert isinstance(fig, Figure) and len(fig.axes) == 4  # 2 windows x 2 slices, row-major
    # Eq. (1) by hand: 255 * (HU - HU_min) / (1024 - HU_min), clipped
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), 255 * (200 + 128) / 1152, rtol=1e-5)
    np.testing.assert_allclose(fig.axes[2].images[0].get_array(), 255 * (200 + 450) / 1474, rtol=1e-5)
    wide = np.asarray(fig.axes[3].images[0].get_array())
    assert wide.min() == 0 and wide.max() == 255
    assert fig.axes[1].get_title() == "osteoporosis #1"
    assert "x_t" in fig.axes[2].get_ylabel()
    with pytest.raises(ValueError, match="titles"):
        plots.show_slices(hu, titles=["only one"])


@pytest.mark.parametrize("n, per_row, rows, cols", [(9, None, 6, 3), (9, 3, 6, 3), (7, 3, 6, 3), (18, 6, 6, 6),
                                                    (4, None, 2, 4), (1, None, 2, 1), (5, 10, 2, 5)])
def test_show_slices_wraps_many_slices_into_readable_blocks(n, per_row, rows, cols):
    """Nine slices in one row made titles a few pixels high on screen: they wrap, in blocks of one row per window."""
    hu = [np.full((8, 8), -1000.0 + 100 * i) for i in range(n)]
    fig = plots.show_slices(hu, titles=[f"t{i}" for i in range(n)], per_row=per_row)
    grid = fig.axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (rows, cols)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 2 * n  # every slice in both windows, no empty panel drawn
    titled = [ax.get_title() for ax in shown if ax.get_title()]
    assert titled == [f"t{i}" for i in range(n)]
    # slice i sits in block i // cols, column i % cols; its x_t panel one row below its x_s panel
    for i in range(n):
        b, c = divmod(i, cols)
        s_ax = fig.axes[(2 * b) * cols + c]
        t_ax = fig.axes[(2 * b + 1) * cols + c]
        hu_i = -1000.0 + 100 * i
        np.testing.assert_allclose(s_ax.images[0].get_array(), np.clip(255 * (hu_i + 128) / 1152, 0, 255), rtol=1e-5)
        np.testing.assert_allclose(t_ax.images[0].get_array(), np.clip(255 * (hu_i + 450) / 1474, 0, 255), rtol=1e-5)
        assert s_ax.get_title() == f"t{i}"
    for ax in fig.axes:
        assert ax.title.get_fontsize() >= 10 or not ax.get_title()
    with pytest.raises(ValueError, match="per_row"):
        plots.show_slices(hu, per_row=0)


def test_hu_histograms_counts_and_means_per_class():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "label": ["osteoporosis"] * 5 + ["normal"] * 7 + ["osteopenia"] * 6,
        "trabecular_hu": np.r_[rng.normal(100, 10, 5), rng.normal(180, 10, 7), rng.normal(140, 10, 6)],
    })
    fig = plots.hu_histograms(df, bins=10)
    (ax,) = fig.axes
    # one histogram per class, in the clinical order, each summing to its number of slices
    per_class = np.array([len(p) for p in [ax.containers[i].patches for i in range(3)]])
    assert (per_class == 10).all()
    assert [_heights(c).sum() for c in _bars(ax)] == [7, 6, 5]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("normal (n=7") and legend[2].startswith("osteoporosis (n=5")
    mean_line = ax.lines[0].get_xdata()[0]
    assert mean_line == pytest.approx(df.loc[df.label == "normal", "trabecular_hu"].mean())
    fig2 = plots.hu_histograms({"a": [1, 2, 3], "b": [4, 5]})
    assert [_heights(c).sum() for c in _bars(fig2.axes[0])] == [3, 2]
    with pytest.raises(KeyError, match="trabecular_hu"):
        plots.hu_histograms(df.drop(columns="trabecular_hu"))


def test_window_comparison_draws_both_views_and_the_transfer_curves():
    hu = np.linspace(-500, 1200, 100).reshape(10, 10)
    fig = plots.window_comparison(hu)
    assert len(fig.axes) == 3
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), np.clip(255 * (hu + 128) / 1152, 0, 255), rtol=1e-5)
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(), np.clip(255 * (hu + 450) / 1474, 0, 255), rtol=1e-5)
    curve_s, curve_t = fig.axes[2].lines[:2]
    x = curve_s.get_xdata()
    np.testing.assert_allclose(curve_s.get_ydata(), np.clip(255 * (x + 128) / 1152, 0, 255), atol=1e-3)
    np.testing.assert_allclose(curve_t.get_ydata(), np.clip(255 * (x + 450) / 1474, 0, 255), atol=1e-3)


def test_grey_levels_between_classes_bar_heights_are_the_eq1_gaps():
    means = {"normal": 178.0, "osteopenia": 143.0, "osteoporosis": 118.0}  # design section 5
    fig = plots.grey_levels_between_classes(means)
    assert len(fig.axes) == 2
    bars_s, bars_t = _bars(fig.axes[1])
    np.testing.assert_allclose(_heights(bars_s), [35 * 255 / 1152, 25 * 255 / 1152], rtol=1e-5)
    np.testing.assert_allclose(_heights(bars_t), [35 * 255 / 1474, 25 * 255 / 1474], rtol=1e-5)
    # only a handful of grey levels separate the classes: the reason windows stay float
    assert _heights(bars_s).max() < 8


def _history(n=4, alpha=True):
    h = []
    for e in range(1, n + 1):
        rec = {"epoch": e, "lr": 1e-3, "train_acc": 0.3 + 0.1 * e, "loss_total": 3.5 - 0.5 * e,
               "loss_ce_f": 1.1 - 0.1 * e, "loss_dis": 0.05 * e}
        if alpha:
            rec["alpha"] = 0.5 + 0.05 * e
        h.append(rec)
    return h


def test_loss_curves_one_line_per_term():
    fig = plots.loss_curves(_history(), title="Ours, seed 0")
    (ax,) = fig.axes
    assert ax.get_title() == "Ours, seed 0"
    assert [l.get_label() for l in ax.lines] == ["total", "ce_f", "dis"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [3.0, 2.5, 2.0, 1.5])
    np.testing.assert_allclose(ax.lines[2].get_xdata(), [1, 2, 3, 4])
    with pytest.raises(ValueError, match="empty"):
        plots.loss_curves([])


def test_alpha_curve_plots_alpha_and_its_start():
    fig = plots.alpha_curve(_history())
    (ax,) = fig.axes
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.55, 0.6, 0.65, 0.7])
    assert ax.lines[1].get_ydata()[0] == 0.5
    with pytest.raises(ValueError, match="alpha"):
        plots.alpha_curve(_history(alpha=False))


def test_confusion_writes_counts_and_colours_row_fractions():
    cm = np.array([[8, 2, 0], [1, 6, 3], [0, 5, 5]])
    fig = plots.confusion(cm, LABELS, title="head f")
    (ax,) = fig.axes
    assert [int(t.get_text()) for t in ax.texts] == cm.ravel().tolist()
    np.testing.assert_allclose(ax.images[0].get_array(), cm / cm.sum(1, keepdims=True))
    assert ax.get_title() == "head f"
    fig2 = plots.confusion({"f": cm, "s": cm.T}, LABELS, title="synthetic data")
    assert len(fig2.axes) == 2 and [a.get_title() for a in fig2.axes] == ["f", "s"]
    assert fig2.get_suptitle() == "synthetic data"
    assert [int(t.get_text()) for t in fig2.axes[1].texts] == cm.T.ravel().tolist()
    with pytest.raises(ValueError, match="labels"):
        plots.confusion(cm, ("a", "b"))


def test_table_bars_heights_and_confidence_intervals():
    df = pd.DataFrame({
        "model": ["ResNet18", "Ours", "clinical threshold"],
        "paper_acc": [66.67, 77.11, None],
        "acc": [50.0, 60.0, 55.0],
        "ci95_low": [40.0, 52.0, 45.5],
        "ci95_high": [61.0, 67.5, 64.0],
    })
    fig = plots.table_bars(df, title="Table 5", ours_label="reproduced, synthetic data")
    (ax,) = fig.axes
    paper, ours = _bars(ax)
    np.testing.assert_allclose(_heights(paper), [66.67, 77.11])  # the row without a paper number has no grey bar
    np.testing.assert_allclose(_heights(ours), [50.0, 60.0, 55.0])
    segs = ours.errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose([s[:, 1].min() for s in segs], [40.0, 52.0, 45.5])
    np.testing.assert_allclose([s[:, 1].max() for s in segs], [61.0, 67.5, 64.0])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("synthetic data" in t for t in labels) and any("paper" in t for t in labels)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(df["model"])
    with pytest.raises(KeyError, match="ci95_low"):
        plots.table_bars(df.drop(columns="ci95_low"))


def _result(s, t):
    return SimpleNamespace(test={"s": {"per_class_accuracy": dict(zip(LABELS, s))},
                                 "t": {"per_class_accuracy": dict(zip(LABELS, t))}})


def test_classwise_bars_show_mean_per_class_accuracy_of_each_head():
    results = [_result([0.5, 0.6, 0.9], [0.8, 0.4, 0.7]), _result([0.7, 0.6, 0.7], [0.6, 0.6, 0.9])]
    fig = plots.classwise_bars(results, title="Fig. 3 (synthetic data)")
    (ax,) = fig.axes
    assert ax.get_title() == "Fig. 3 (synthetic data)"
    g_s, g_t = _bars(ax)
    np.testing.assert_allclose(_heights(g_s), [60, 60, 80])
    np.testing.assert_allclose(_heights(g_t), [70, 50, 80])
    assert [t.get_text() for t in ax.get_xticklabels()] == list(LABELS)
    assert len(ax.lines) == 4  # one row of dots per seed and head
    single = plots.classwise_bars(results[0])
    np.testing.assert_allclose(_heights(_bars(single.axes[0])[0]), [50, 60, 90])


def test_gradcam_grid_overlays_each_cam_on_its_image():
    rng = np.random.default_rng(1)
    imgs = [[rng.uniform(0, 255, (6, 6)) for _ in range(3)] for _ in range(2)]
    cams = [[rng.uniform(0, 1, (6, 6)) for _ in range(3)] for _ in range(2)]
    fig = plots.gradcam_grid(imgs, cams, row_titles=["normal", "osteoporosis"], col_titles=["x_t", "G_s", "G_t"],
                             title="Fig. 4")
    assert fig.get_suptitle() == "Fig. 4"
    assert len(fig.axes) == 6
    ax = fig.axes[4]  # row 1, column 1
    assert len(ax.images) == 2
    np.testing.assert_allclose(ax.images[0].get_array(), imgs[1][1])
    np.testing.assert_allclose(ax.images[1].get_array(), cams[1][1])
    assert fig.axes[2].get_title() == "G_t" and fig.axes[3].get_ylabel() == "osteoporosis"
    cams[0][2] = np.zeros((5, 5))
    with pytest.raises(ValueError, match="differ"):
        plots.gradcam_grid(imgs, cams)


def test_save_figure_writes_a_png(tmp_path):
    fig = plots.confusion(np.eye(3, dtype=int), LABELS)
    out = plots.save_figure(fig, tmp_path / "figures" / "sub" / "cm.png")
    data = out.read_bytes()
    assert out.parent.is_dir() and len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="PNG"):
        plots.save_figure(fig, tmp_path / "cm.pdf")


def test_gradcam_grid_cell_without_cam_shows_the_slice_alone():
    img = np.full((4, 4), 100.0)
    fig = plots.gradcam_grid([[img, img]], [[None, np.ones((4, 4))]])
    assert [len(a.images) for a in fig.axes] == [1, 2]
