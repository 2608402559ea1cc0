"""The demo end to end at a small setting: it writes its report and finds flipped labels."""
import re

from fastdd import demo


def test_demo_writes_report_and_flags_flipped_labels(tmp_path):
    demo.main(["--out", str(tmp_path), "--epochs", "12", "--threads", "1"])
    report = (tmp_path / "per_sample_gradients.md").read_text()
    assert (tmp_path / "per_sample_gradients.png").stat().st_size > 10_000
    assert "per_sample_gradients.md" in (tmp_path / "README.md").read_text()
    auc = float(re.search(r"ROC AUC of the mean gradient norm for finding flipped labels: \*\*([0-9.]+)", report).group(1))
    acc = float(re.search(r"test accuracy \(clean test labels\): \*\*([0-9.]+)", report).group(1))
    assert auc > 0.9, report  # noisy labels stand out by their gradient norms
    assert acc > 0.85, report
