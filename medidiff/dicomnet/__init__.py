"""DICOM networking for `medidiff listen` (pynetdicom).

- :mod:`~medidiff.dicomnet.listener`: the C-STORE/C-ECHO SCP and the loop that runs the pipeline.
- :mod:`~medidiff.dicomnet.studies`: the incoming spool and study-completion tracking (idle timeout).
- :mod:`~medidiff.dicomnet.outbox`: the durable outbox that sends derived files by C-STORE, with retries.
- :mod:`~medidiff.dicomnet.events`: structured JSON-line logs (hashed keys only).
"""
