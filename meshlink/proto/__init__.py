"""The versioned sans-IO tunnel wire protocol: frames, streams, flow-control windows."""
