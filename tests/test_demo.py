"""The demo end to end at small settings: it writes its reports, finds flipped labels,
and draws pruning curves."""
import re

from fastdd import demo


def test_demo_per_sample_section(tmp_path):
    demo.main(["--out", str(tmp_path), "--epochs", "12", "--threads", "1", "--only", "grad"])
    report = (tmp_path / "per_sample_gradients.md").read_text()
    assert (tmp_path / "per_sample_gradients.png").stat().st_size > 10_000
    assert "per_sample_gradients.md" in (tmp_path / "README.md").read_text()
    auc = float(re.search(r"ROC AUC of the mean gradient norm for finding flipped labels: \*\*([0-9.]+)", report).group(1))
    acc = float(re.search(r"test accuracy \(clean test labels\): \*\*([0-9.]+)", report).group(1))
    assert auc > 0.9, report  # noisy labels stand out by their gradient norms
    assert acc > 0.85, report


def test_demo_pruning_section(tmp_path):
    demo.main(["--out", str(tmp_path), "--epochs", "3", "--seeds", "1", "--threads", "1", "--only", "pruning"])
    report = (tmp_path / "pruning.md").read_text()
    assert (tmp_path / "pruning_curve.png").stat().st_size > 10_000
    rows = re.findall(r"^\| (\d+)% \| ([0-9.]+) ± [0-9.]+ \| ([0-9.]+) ± [0-9.]+ \| ([0-9.]+) ± [0-9.]+ \|$", report, re.M)
    assert [r[0] for r in rows] == ["10", "20", "30", "50", "70", "100"]
    full = rows[-1]
    assert full[1] == full[2] == full[3]  # 100% kept: every policy trains on the same data
    assert float(full[1]) > float(rows[0][3]), report  # all the data beats 10% random
    # compute is counted, so it scales with the kept fraction: keep 10% costs 10.0% of the full data
    cost = dict(re.findall(r"^\| keep (\d+)% \| \d+ \| [0-9.]+ [A-Z]*FLOP \| ([0-9.]+)% \|$", report, re.M))
    assert cost["100"] == "100.0" and cost["10"] == "10.0", report
    assert "pruning.md" in (tmp_path / "README.md").read_text()


def test_demo_valuation_section(tmp_path):
    demo.main(["--out", str(tmp_path), "--permutations", "3", "--threads", "1", "--only", "valuation"])
    report = (tmp_path / "valuation.md").read_text()
    assert (tmp_path / "valuation_roc.png").stat().st_size > 10_000
    assert (tmp_path / "valuation_harmful.png").stat().st_size > 10_000
    aucs = dict(re.findall(r"^\| ([^|]+?) \| ([0-9.]+) \|$", report, re.M))
    assert float(aucs["KNN-Shapley (low = harmful)"]) >= 0.9, report
    assert float(aucs["self-influence, logistic regression"]) >= 0.9, report
    assert "valuation.md" in (tmp_path / "README.md").read_text()
