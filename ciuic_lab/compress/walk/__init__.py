"""The block walk: how a model's blocks are visited, calibrated and compressed.

    blocks.py       providers (Resident, Offloaded, Streamed; store.checkpoint.Stored) that hand
                    out one block at a time, calibration activations, routed experts by chunks
    pipeline.py     plan (profile and policies) and the compress walk into a sink; the Fisher walk
    distributed.py  the walk's steps split among processes (torch.distributed)
"""
