"""Handler modules that ``SMS_HANDLER`` must refuse at start-up, one flaw each."""
