# cityscapes: mmseg standard layout under data_root (see docs/integrations.md); whole-image
# inference, no resize (the adapter resizes internally, labels come back at the original size).
# Class names: dslo's 'cityscapes' class file (dslo.adapters.vocab), set as model.classes.
dataset_type = 'CityscapesDataset'
data_root = 'data'
dslo_classes = 'cityscapes'
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
test_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root + '/cityscapes',
        data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
        img_suffix='_leftImg8bit.png',
        seg_map_suffix='_gtFine_labelTrainIds.png',
        reduce_zero_label=False,
        pipeline=test_pipeline))
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
