"""``python -m cnn bench keras``: our sequential path against Keras, both on one thread, in
this process, interleaved (:mod:`cnn.bench.harness`); per configuration the table and, at the
end, ours/Keras per preset and batch size."""
from __future__ import annotations

from .harness import (DEFAULT_IMAGES, QUICK_IMAGES, compare, epoch_images, keras_contender,
                      ours_contender, print_rows, synthetic_batch)


def suite(repeats: int = 5, quick: bool = False, presets=None, batch_sizes=None) -> list[dict]:
    """Sequential path vs Keras per preset and batch size; prints ours/Keras per
    configuration. ``quick``: a few images per epoch (a smoke run)."""
    presets = presets or ("mnist_small", "cifar_tutorial")
    images = QUICK_IMAGES if quick else DEFAULT_IMAGES
    results = []
    for preset in presets:
        n = epoch_images(images, preset)
        x, y = synthetic_batch(preset, n)
        for bs in batch_sizes or (32, 128):
            rows = compare([keras_contender(preset, x, y, bs), ours_contender(preset, x, y, bs)],
                           n, repeats)
            print_rows(f"{preset}, batch {bs}, {n} images/epoch (ratio = / keras)", rows)
            results.append({"preset": preset, "batch_size": bs, "keras": rows[0]["median"],
                            "ours": rows[1]["median"],
                            "ratio_ours_keras": rows[1]["median"] / rows[0]["median"]})
    print("\nsummary (images/s, median; ratio ours/keras):")
    for r in results:
        print(f"  {r['preset']:<15} batch {r['batch_size']:>4}: ours {r['ours']:>8,.0f}  "
              f"keras {r['keras']:>8,.0f}  ratio {r['ratio_ours_keras']:.2f}")
    return results
