-- Dead letters expire after IIOT_DEAD_LETTER_RETENTION_DAYS (the daily dead_letter_retention
-- asset) and are listed and replayed by time: both look them up by received_at alone.
CREATE INDEX dead_letters_received ON dead_letters (received_at);
