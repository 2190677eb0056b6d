# coco-stuff: mmseg standard layout under data_root (see docs/integrations.md); whole-image
# inference, no resize (the adapter resizes internally, labels come back at the original size).
# Class names: dslo's 'coco_stuff' class file (dslo.adapters.vocab), set as model.classes.
dataset_type = 'COCOStuffDataset'
data_root = 'data'
dslo_classes = 'coco_stuff'
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
        data_root=data_root + '/coco_stuff164k',
        data_prefix=dict(img_path='images/val2017', seg_map_path='annotations/val2017'),
        img_suffix='.jpg',
        seg_map_suffix='_labelTrainIds.png',
        reduce_zero_label=False,
        pipeline=test_pipeline))
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
