"""Overrides that keep a method's unit test on CPU: choosing a method applies its published set-up
(Swin-B or ViT-B at paper resolution, config.METHOD_DEFAULTS); these pin the tiny 3D ResNet."""

TINY = ["model.image_encoder=resnet3d", "model.size=tiny"]
