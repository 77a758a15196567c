"""Faithful emulators of the providers' server side, for demos and tests.

Same wire formats and real cryptography as WeChat Pay API v3 and Alipay OpenAPI,
plus the guest's actions (scan, pay). Refuses to run in production mode.
"""
