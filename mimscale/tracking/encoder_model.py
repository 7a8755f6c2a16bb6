"""The final encoder as an MLflow pyfunc model: an image batch in, its features out.

MLflow logs this file as the model's code ("models from code", tracking.Tracker.log_encoder) and
runs it when the model is loaded; no mimscale module imports it. Its one artifact, ``encoder``, is
the export directory (python -m mimscale.export: timm's config.json + model.safetensors and
mimscale.json), read through mimscale.checkpoint.weights: safetensors only, nothing from the network.

    model = mlflow.pyfunc.load_model(model_uri)
    features = model.predict(images)                          # [N, D] float32, the CLS token
    features = model.predict(images, params={"pool": "mean"})  # the mean of the patch tokens

``images``: float32 [N, 3, S, S] (S = the model's img_size), normalized as in training: the mean
and std in the export's config.json (``pretrained_cfg``) and in the model's metadata (ImageNet's).
Features are the final LayerNorm's output, pooled as ``mimscale.eval`` pools them (``--pool``).
"""
import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from mimscale.checkpoint.weights import load_encoder

ARTIFACT = "encoder"  # the artifacts key of the export directory
POOLS = ("cls", "mean")


def pool_features(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """tokens [N, 1 + L, D] -> [N, D]: the CLS token, or the mean of the L patch tokens."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"params pool={pool!r}: allowed values: {', '.join(POOLS)}")


class EncoderFeatures(PythonModel):
    def load_context(self, context) -> None:
        self.encoder, self.model = load_encoder(context.artifacts[ARTIFACT], "the MLflow model's encoder artifact")

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        """model_input float32 [N, 3, S, S] (the signature's tensor spec) -> float32 [N, D]. The
        np.ndarray hint tells MLflow to check inputs against the signature, not to infer one."""
        images = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32))
        size = self.model["img_size"]
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"expected images of shape [N, 3, {size}, {size}], got {list(images.shape)}")
        with torch.inference_mode():
            tokens = self.encoder(images)  # [N, 1 + L, D]
            return pool_features(tokens, (params or {}).get("pool", "cls")).float().numpy()


set_model(EncoderFeatures())
