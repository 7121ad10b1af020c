"""Tag-triggered image collection: campaigns decide, the store keeps, the uploader takes."""
