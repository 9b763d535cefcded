"""Cost of explanations against the plain label, in the batched scoring path.

Labels the bundled sample capture's matrices (tiled to --n) with :class:`Predictor`:

* ``plain``: ``explain=False``, one forward pass (trust from the confidence alone);
* ``explained``: every label explained (exact Shapley values over 6 groups, 64 coalitions,
  the structured pass that encodes each row variant once) and decided;
* ``explained, generic``: the same values by running the CNN on all 63 masked matrices
  (what the structured pass saves);
* ``logged only``: plain labels, then explanations for a share of them (the labels a log
  policy keeps), via ``Predictor.assess_subset``.

Timing does not depend on the weights: without ``--model`` (or the shipped model) it uses
an untrained CNN of the default configuration with a trust state fitted on the same data.
Run: ``python benchmarks/bench_trust.py [--model M] [--n 4096] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import iotcls  # noqa: F401  first: it sets OMP_WAIT_POLICY before torch loads
from iotcls.bundle import BundleError, ModelBundle
from iotcls.capture import CaptureSpec
from iotcls.dataset import capture_matrices
from iotcls.layout import MatrixLayout
from iotcls.model import IoTCNN, ModelConfig
from iotcls.predict import Predictor
from iotcls.trust.layer import fit_state
from iotcls.trust.shapley import GroupShapley


def sample_matrices(layout: MatrixLayout) -> np.ndarray:
    """The real devices of the tests' sample (merged from ../shared), else the demo network."""
    import tempfile

    from iotcls.demo import write_demo_pcap
    from iotcls.testing.shared import missing, sentinel_dir, write_sample

    with tempfile.TemporaryDirectory() as tmp:
        if missing(sentinel_dir()) is None:
            sample = write_sample(Path(tmp))
            pcap, macs = sample.pcap, sample.macs
            print(f"matrices: the tests' sample, merged from {sentinel_dir()}")
        else:
            pcap = Path(tmp) / "demo.pcap"
            macs = [d.mac for d in write_demo_pcap(pcap).devices]
            print("matrices: the synthetic demo network (../shared not found)")
        cm = capture_matrices(CaptureSpec(pcap, "sample", {m: "" for m in macs}), layout)
    return cm.matrices


def bundle_for(path: str | None) -> ModelBundle:
    try:
        return ModelBundle.load(path)
    except BundleError:
        if path:
            raise
    layout = MatrixLayout()
    torch.manual_seed(0)
    model = IoTCNN(ModelConfig.from_layout(layout, 27)).eval()
    classes = [f"class{i:02d}" for i in range(27)]
    x = sample_matrices(layout)
    with torch.inference_mode():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    y[::7] = (y[::7] + 1) % 27  # some wrong references, as real validation data has
    state, _ = fit_state(model, layout, 1.0, classes, x, y)
    return ModelBundle(model, layout, classes, 1.0, {}, state.to_dict(), source="untrained")


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model bundle (default: shipped model, else untrained)")
    ap.add_argument("--n", type=int, default=4096, help="matrices per run")
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--logged", type=float, default=0.1, help="share of labels logged")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = bundle_for(args.model)
    x = sample_matrices(bundle.layout)
    x = np.ascontiguousarray(np.resize(x, (args.n, *x.shape[1:])))
    rng = np.random.default_rng(0)
    logged = np.sort(rng.choice(args.n, max(1, int(args.logged * args.n)), replace=False))
    print(
        f"bench_trust: {bundle.source or bundle.name}, {args.n} matrices "
        f"{bundle.layout.rows}x{bundle.layout.width}, torch threads {args.threads}"
    )
    for batch in args.batch:
        plain_p = Predictor(bundle, batch_size=batch, explain=False)
        expl_p = Predictor(bundle, batch_size=batch)
        plain_p.predict(x[:64])
        expl_p.predict(x[:64])
        t_plain = best_of(
            lambda: [plain_p.predict(x[i : i + batch]) for i in range(0, args.n, batch)],
            args.repeat,
        )
        t_expl = best_of(
            lambda: [expl_p.predict(x[i : i + batch]) for i in range(0, args.n, batch)], args.repeat
        )

        def logged_only():
            for i in range(0, args.n, batch):
                p = plain_p.predict(x[i : i + batch])
                sel = logged[(logged >= i) & (logged < i + batch)] - i
                expl_p.assess_subset(x[i : i + batch], p, sel)

        t_logged = best_of(logged_only, args.repeat)
        generic = GroupShapley.for_layout(bundle.model, bundle.layout, structured=False)
        n_gen = min(args.n, 1024)
        t_gen = (
            best_of(
                lambda: [
                    generic.explain(x[i : i + batch], all_classes=True)
                    for i in range(0, n_gen, batch)
                ],
                1,
            )
            * args.n
            / n_gen
        )
        us = 1e6 / args.n
        print(f"batch {batch}:")
        print(
            f"  plain label            {t_plain * us:9.1f} us/label  "
            f"{args.n / t_plain:9.0f} labels/s"
        )
        print(
            f"  explained (all)        {t_expl * us:9.1f} us/label  "
            f"{args.n / t_expl:9.0f} labels/s  {t_expl / t_plain:5.2f}x plain"
        )
        print(
            f"  explained, generic     {t_gen * us:9.1f} us/label  "
            f"{args.n / t_gen:9.0f} labels/s  {t_gen / t_plain:5.2f}x plain"
        )
        print(
            f"  logged only ({args.logged:.0%})     {t_logged * us:9.1f} us/label  "
            f"{args.n / t_logged:9.0f} labels/s  {t_logged / t_plain:5.2f}x plain"
        )


if __name__ == "__main__":
    main()
