# voc20: mmseg standard layout under data_root (see docs/integrations.md); whole-image
# inference, no resize (the adapter resizes internally, labels come back at the original size).
# Class names: dslo's 'voc20' class file (dslo.adapters.vocab), set as model.classes.
dataset_type = 'PascalVOC20Dataset'
data_root = 'data'
dslo_classes = 'voc20'
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
        data_root=data_root + '/VOCdevkit/VOC2012',
        data_prefix=dict(img_path='JPEGImages', seg_map_path='SegmentationClass'),
        ann_file='ImageSets/Segmentation/val.txt',
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True,
        pipeline=test_pipeline))
test_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
