"""Standard sample-quality metrics with the TF-Inception v3 of every published FID.

``inception``: the network (no torchvision) and its weights; ``scores``: FID, KID, IS and
precision/recall on feature sets; ``sources``: images and statistics files, read in
batches; ``measure``: images or a model's samples -> features -> scores, streamed.

    net = load_inception("pt_inception-2015-12-05-6726825d.pth")
    ref = source_features(net, open_source("cifar_train/"), batch_size=250)
    fake = source_features(net, open_source("samples.npz"), batch_size=250)
    scores(fake, ref)   # {"fid", "kid", "kid_se", "is", "is_std", "precision", "recall", ...}
"""

from .inception import InceptionV3, find_inception_weights, load_inception
from .measure import Features, extract_features, sample_features, scores, source_features
from .scores import (
    feature_stats,
    features_fid,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from .sources import ImageSource, Statistics, open_source

__all__ = [
    "Features",
    "ImageSource",
    "InceptionV3",
    "Statistics",
    "extract_features",
    "feature_stats",
    "features_fid",
    "find_inception_weights",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_inception",
    "open_source",
    "precision_recall",
    "sample_features",
    "scores",
    "source_features",
]
