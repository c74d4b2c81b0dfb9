"""Where bytes live and move: object storage and the files a job produces.

    storage.py        one Store API over s3://, file:// and pvc:// (retries, atomic puts)
    model_source.py   the model cache: a job's model fetched once per node, GGUF dequantized
    export_format.py  what a finished export is (manifest, hashes, publish, check; no torch)
    checkpoint/       checkpoints: manifests with hashes, committed last; resume, rotation, retries
    embedded_s3.py    SeaweedFS as a local S3 server (`kubetune run --embedded-s3`)
    net.py            free loopback ports for the local servers
Writing an export from a trained model is the trainer's step: train/export.py.
"""
