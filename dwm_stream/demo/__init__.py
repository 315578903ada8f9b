"""The embedded default, with nothing downloaded: a SlimPajama-format corpus built from text on this machine
(``corpus``), a loopback S3 endpoint (``loopback_s3``), data preparation shared with the quality benchmark
(``data``) and the end-to-end demo (``run``)."""
