# dslo on coco-object: CLIP ViT-B/16 + SD2 attention + velocity solver.
#   python -m mmengine ... or: from mmengine.runner import Runner; Runner.from_cfg(Config.fromfile(THIS)).test()
# Paths: override data_root with --cfg-options test_dataloader.dataset.data_root=DATA/coco_stuff164k
_base_ = ['../_base_/default_runtime.py', '../_base_/datasets/coco_object.py', '../_base_/models/ovss_clip_sd2.py']
model = dict(classes='coco_object')
