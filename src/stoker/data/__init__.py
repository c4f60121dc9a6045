"""sd-scripts datasets as they are: config, catalog, buckets, captions, images, sampler, dataset."""
