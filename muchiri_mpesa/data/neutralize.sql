-- A copy of the database (staging, tests) must not take real payments nor reuse production secrets.
UPDATE payment_provider
   SET mpesa_consumer_key = 'dummykey',
       mpesa_consumer_secret = 'dummysecret',
       mpesa_passkey = 'dummypasskey',
       mpesa_initiator_password = NULL,
       mpesa_callback_secret = md5(random()::text),
       mpesa_callback_base_url = NULL
 WHERE code = 'mpesa';
DELETE FROM muchiri_mpesa_token;
