"""The triggers that relaybot starts itself: `poll` (new items of an HTTP answer) and `schedule` (cron times).

`config` holds their workflow-file models, `schedule` the cron arithmetic, `poll` one poll of one subscription,
`loop` the task that claims due subscriptions across processes, and `status` what `/relay list` shows about them.
"""
