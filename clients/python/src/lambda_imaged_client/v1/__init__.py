"""Stubs generated from proto/lambda_imaged/v1/ by clients/python/generate.sh; do not edit them."""
