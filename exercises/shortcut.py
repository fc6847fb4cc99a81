"""Experiment: the demo with a weaker or stronger planted shortcut (see README, "Experiments to try").

    python exercises/shortcut.py --strength 0 --demo-dir runs/shortcut0      # no shortcut in training
    python exercises/shortcut.py --strength 2 --demo-dir runs/shortcut2      # twice data.py's shortcut

data.py plants the shortcut in `_train_prevalence`: P(finding | race, age, gender) in train and val
(cardiomegaly common in black patients, effusion and devices in the old, ...), while the test split
draws findings independently of demographics at the marginal rates m_f = data.TEST_PREVALENCE[f].
This script scales the demographic part of the training rates around those marginals,

    p_s(f | d) = clip(m_f + s * (p(f | d) - m_f), 0.01, 0.99),

so s = 0 removes the shortcut (same marginal rates, findings independent of demographics), s = 1
is data.py as written (the default demo), s > 1 strengthens it. The demographic traces in the
images (data._render) are untouched. Every other argument goes to `train.py --demo`; the demo
directory must be new (or made by this script with the same strength), because the demo reuses
the data, base models and runs it finds there.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import data  # noqa: E402


def set_strength(s):
    """Patch data.py's training prevalence to strength s (1 = unchanged); returns a function that undoes it."""
    original, original_test = data._train_prevalence, data.TEST_PREVALENCE
    marginal = dict(original_test)

    def prevalence(race, age, male):
        return {f: min(0.99, max(0.01, marginal[f] + s * (p - marginal[f])))
                for f, p in original(race, age, male).items()}

    data._train_prevalence = prevalence
    data.TEST_PREVALENCE = data._marginal_prevalence()  # unchanged for s <= 1; clipping can move it above

    def undo():
        data._train_prevalence, data.TEST_PREVALENCE = original, original_test
    return undo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strength", type=float, required=True, help="shortcut strength s (0 none, 1 data.py's)")
    ap.add_argument("--demo-dir", required=True, help="a new folder for this experiment's data, models and runs")
    args, rest = ap.parse_known_args(argv)
    if args.strength < 0:
        ap.error("--strength must be >= 0")
    root = Path(args.demo_dir)
    marker = root / "shortcut.json"
    if (root / "data").exists():
        made = json.loads(marker.read_text())["strength"] if marker.is_file() else None
        if made != args.strength:
            ap.error(f"{root} already holds demo data made with strength {made}; use a new --demo-dir")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"strength": args.strength}))
    set_strength(args.strength)
    import train
    train.main(["--demo", "--demo-dir", str(root), *rest])


if __name__ == "__main__":
    main()
