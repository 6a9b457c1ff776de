"""The admin web page (`python -m edge web`): people, enrolment, log, live view, status and the unknown-face inbox."""
