"""Photo-like test images for the benchmarks: smooth shading plus sensor-like noise.

Random pixels would be the wrong workload: they compress badly (JPEGs several times
larger than a photo's) and decode slower, while flat colours decode faster. Smooth shapes
with noise give JPEG sizes near real photos (~40-80 kB at 500x375).
"""


def photo_jpeg(width, height, rng, quality=90):
    """Encoded JPEG bytes of a width x height photo-like image; `rng` a numpy Generator.

    Draws three phases, then the noise, from `rng`: one generator makes a reproducible series.
    """
    import io

    import numpy as np
    from PIL import Image

    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.random(3) * 6.28
    pixels = np.stack([127 + 100 * np.sin(columns / (20 + 10 * channel) + rows / 35 + phase[channel])
                       for channel in range(3)], axis=-1)
    pixels += rng.normal(0, 12, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
