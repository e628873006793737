"""Serving a distilled student: `ddil serve`, a KServe custom predictor (kserve.Model served by kserve.ModelServer).

- source.py     where the student comes from: a folder, s3:// (the project's loader) or registry://NAME/VERSION
- protocol.py   KServe v1 (`/v1/models/NAME:predict`) and v2 open inference (`/v2/models/NAME/infer`) requests,
                validated against the limits (a bad field is an HTTP 400 naming it), and PNG (base64) responses
- openai_api.py the OpenAI images API (`/openai/v1/images/generations`, `/openai/v1/models`) on the same server,
                errors in OpenAI's shape naming the field, and the request-body cap (413)
- batcher.py    request batching: instances of concurrent requests with the same settings run as one batch
- predictor.py  the kserve.Model and `serve()`: the server listens at once, readiness turns true when loaded

The images are ddil_core/models/sampling.py's `student_images`: the same sampler, steps, guidance and seeds as
`ddil sample`.

KServe's Hugging Face runtime does not serve diffusers pipelines (kserve/kserve issues #3508 and #3914), hence a
custom predictor on the project image. Only `serve` needs the `serve` extra (kserve); the rest of ddil_core does
not import it.
"""
