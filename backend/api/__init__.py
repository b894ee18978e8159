"""The HTTP layer Label Studio talks to. It parses, validates, queues and waits; it never imports torch."""
