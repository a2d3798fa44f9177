"""Generative purifiers and the small generative models Bastion trains for them.

=============  ==============================  =========================  ==================
defense        generative model                trained by                 transform name
=============  ==============================  =========================  ==================
PixelDefend    `PixelCNN` (masked convs)       `train_pixelcnn`           ``"pixeldefend"``
Defense-GAN    `Generator` (DCGAN-like)        `train_gan`                ``"defense-gan"``
MagNet         `DenoisingAutoencoder`          `train_autoencoder`        ``"magnet"``
=============  ==============================  =========================  ==================

Models are saved as safetensors + JSON (`save_generative`) and rebuilt from the JSON alone
(`load_generative`); ``benchmarks/train_generative.py`` trains all three on a dataset. The
registered transforms (`bastion.defenses.transforms.purifiers`) take a checkpoint path or a
module.

Example:
    >>> from bastion.defenses.generative import train_autoencoder
    >>> from bastion.defenses.transforms import create_transform
    >>> train_autoencoder("mnist-5k", epochs=20, save_to="runs/gen/autoencoder")
    >>> reformer = create_transform("magnet:model=runs/gen/autoencoder")
"""

from ._common import GENERATIVE_KINDS, load_generative, save_generative
from .autoencoder import MNIST_STRUCTURE, DenoisingAutoencoder, load_autoencoder, train_autoencoder
from .defensegan import defensegan_project
from .gan import Discriminator, Generator, load_generator, train_gan
from .magnet import jensen_shannon, probability_divergence, reform
from .pixelcnn import MaskedConv2d, PixelCNN, causal_mask, load_pixelcnn, train_pixelcnn
from .pixeldefend import pixeldefend

__all__ = [
    "GENERATIVE_KINDS", "MNIST_STRUCTURE", "DenoisingAutoencoder", "Discriminator", "Generator", "MaskedConv2d",
    "PixelCNN", "causal_mask", "defensegan_project", "jensen_shannon", "load_autoencoder", "load_generative",
    "load_generator", "load_pixelcnn", "pixeldefend", "probability_divergence", "reform", "save_generative",
    "train_autoencoder", "train_gan", "train_pixelcnn",
]
