"""Volumes and datasets as every component sees them: reading NIfTI headers and volumes, dataset
layouts with their content digest and manifest, data profiles, and preprocessing chains
described as JSON and rebuilt from it. Used by ``mlpipe.log``, the inference core, ``drift`` and
the seg3d project."""
