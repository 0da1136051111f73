"""Grad-CAM: where in the X-ray the fracture model looked, as a heatmap over the model input.

The classifiers are `input -> Normalization -> ResNet50 (a nested keras Model) -> Dropout ->
Dense`. Grad-CAM (Selvaraju et al., 2017) weights each channel of the backbone's last
convolutional block (`conv5_block3_out`) by the mean gradient of the class score, sums the
channels and keeps the positive part. The score is the head's logit, not its sigmoid: the
sigmoid's gradient vanishes when the model is confident, which would blank the heatmap exactly
when a clinician most wants to see why. The map is coarse (input side / 32: 7 x 7 at 224 px,
2 x 2 at 64 px) and is resized to the input for the overlay.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from bonefrac.models import backbone_of

LAST_CONV_LAYER = "conv5_block3_out"
OVERLAY_ALPHA = 0.4  # share of the colour map in the overlay; the X-ray stays readable


@dataclass(frozen=True)
class Explanation:
    heatmap: np.ndarray  # (S, S) float32 in [0, 1], resized to the model input
    overlay_png: bytes  # the preprocessed image with the heatmap blended in (JET colour map)


class GradCam:
    """Grad-CAM for one classifier, traced once (a `tf.function`) and reused per request."""

    def __init__(self, model, layer_name: str = LAST_CONV_LAYER) -> None:
        import keras
        import tensorflow as tf

        backbone = backbone_of(model)
        # One model giving the last conv block and the pooled features from the same forward
        # pass, so the gradient flows from the score back through the pooling to the block.
        features = keras.Model(
            backbone.inputs, [backbone.get_layer(layer_name).output, backbone.output]
        )
        layers = [la for la in model.layers if not isinstance(la, keras.layers.InputLayer)]
        split = layers.index(backbone)
        before, after = layers[:split], layers[split + 1 :]
        head = after[-1]
        size = model.input_shape[1]

        def score(pooled):
            x = pooled
            for layer in after[:-1]:
                x = layer(x, training=False)
            if isinstance(head, keras.layers.Dense):
                logits = tf.matmul(x, head.kernel) + head.bias  # pre-activation
            else:
                logits = head(x, training=False)
            return logits[:, -1]  # binary head: the "abnormal" logit

        @tf.function(input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
        def cam(images):
            x = images
            for layer in before:
                x = layer(x, training=False)
            with tf.GradientTape() as tape:
                conv, pooled = features(x, training=False)  # (N, h, w, C), (N, C)
                tape.watch(conv)
                target = score(pooled)
            grads = tape.gradient(target, conv)  # (N, h, w, C)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
            maps = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1))  # (N, h, w)
            peak = tf.reduce_max(maps, axis=(1, 2), keepdims=True)
            return tf.math.divide_no_nan(maps, peak)

        self._cam = cam
        self.size = size

    def heatmaps(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 model inputs -> (N, S, S) float32 heatmaps in [0, 1]."""
        maps = self._cam(np.asarray(images, dtype=np.float32)).numpy()
        return np.stack([_resize(m, self.size) for m in maps]).astype(np.float32)

    def explain(self, image: np.ndarray) -> Explanation:
        """One (S, S, 3) uint8 model input -> its heatmap and a PNG overlay."""
        heatmap = self.heatmaps(image[None])[0]
        return Explanation(heatmap, overlay_png(image, heatmap))


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> bytes:
    """Blend a [0, 1] heatmap (JET: blue = low, red = high) over a uint8 (S, S, 3) image."""
    colour = cv2.applyColorMap(np.rint(heatmap * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(np.ascontiguousarray(image), 1 - alpha, colour, alpha, 0)
    ok, encoded = cv2.imencode(".png", blended)  # BGR in, and the grey image is the same in RGB
    if not ok:
        raise RuntimeError("OpenCV could not encode the Grad-CAM overlay as PNG")
    return encoded.tobytes()


def _resize(heatmap: np.ndarray, size: int) -> np.ndarray:
    # Bicubic smooths the block-sized cells without moving their peaks; clip its overshoot.
    resized = cv2.resize(heatmap.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(resized, 0.0, 1.0)
