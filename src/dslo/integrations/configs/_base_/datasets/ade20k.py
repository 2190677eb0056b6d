# ade20k: mmseg standard layout under data_root (see docs/integrations.md); whole-image
# inference, no resize (the adapter resizes internally, labels come back at the original size).
# Class names: dslo's 'ade20k' class file (dslo.adapters.vocab), set as model.classes.
dataset_type = 'ADE20KDataset'
data_root = 'data'
dslo_classes = 'ade20k'
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
        data_root=data_root + '/ADEChallengeData2016',
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True,
        pipeline=test_pipeline))
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
