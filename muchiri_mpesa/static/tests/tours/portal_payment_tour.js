/** @odoo-module **/

import { registry } from "@web/core/registry";

import { loginAndOpenQuotation, pageLoaded, payWith } from "./tour_steps";

// These tours rely on the data of muchiri_mpesa/tests/test_portal.py (TestPortalTour): one sent quotation of the
// portal user "distributor", payable with M-Pesa only, and a Daraja simulator that answers the
// prompt after a couple of seconds (the outcome is chosen by the phone number).  The till's tour
// relies on muchiri_mpesa/tests/test_b2b_flows.py (TestTillTour): the distributor's till pays.

registry.category("web_tour.tours").add("muchiri_mpesa_portal_pay_success", {
    url: "/web/login",
    steps: () => [
        ...loginAndOpenQuotation(),
        {
            content: "Enter a number that is not a Safaricom one",
            trigger: "#modalaccept #o_mpesa_phone",
            run: "edit 0812345678",
        },
        {
            content: "Try to pay",
            trigger: "#modalaccept button[name='o_payment_submit_button']:enabled",
            run: "click",
        },
        {
            content: "The browser refuses the number before anything is sent",
            trigger: "#modalaccept #o_mpesa_phone:invalid",
            run() {
                const message = this.anchor.validationMessage;
                if (!message.includes("Safaricom number")) {
                    throw new Error(`Unexpected validity message: "${message}"`);
                }
            },
        },
        ...payWith("0708374149"),
        {
            content: "Back on the order: the payment is confirmed",
            trigger:
                "#quote_content div[name='o_payment_status_alert']" +
                ":contains(Your M-Pesa payment has been received)",
            timeout: 30000,
        },
        {
            content: "The quotation became a sales order",
            trigger: "#quote_content h2:contains(Sales Order)",
        },
        pageLoaded("The order's page is fully loaded"),
    ],
});

registry.category("web_tour.tours").add("muchiri_mpesa_portal_pay_cancelled", {
    url: "/web/login",
    steps: () => [
        ...loginAndOpenQuotation(),
        ...payWith("254700000001"),
        {
            content: "Back on the quotation: the payment is cancelled",
            trigger:
                "#quote_content div[name='o_payment_status_alert']" +
                ":contains(The M-Pesa payment was cancelled)",
            timeout: 30000,
        },
        {
            content: "The order is still a quotation, that can be paid again",
            trigger: "#quote_content h2:contains(Quotation)",
        },
        {
            trigger: "#o_sale_portal_paynow",
        },
        pageLoaded("The quotation's page is fully loaded"),
    ],
});

registry.category("web_tour.tours").add("muchiri_mpesa_portal_whole_shillings", {
    url: "/web/login",
    steps: () => [
        ...loginAndOpenQuotation(),
        {
            content: "Before the prompt, the form says what the phone will ask: whole shillings",
            trigger: "#modalaccept .o_mpesa_whole_shillings:contains(M-Pesa takes whole shillings):contains(4,502.00)",
        },
    ],
});

registry.category("web_tour.tours").add("muchiri_mpesa_portal_pay_from_till", {
    url: "/web/login",
    steps: () => [
        ...loginAndOpenQuotation(),
        {
            content: "The form offers the distributor's till beside the phone",
            trigger: "#modalaccept label[for='o_mpesa_pay_from_till']:contains(Pay from your till):contains(600100)",
        },
        {
            content: "Choose the till",
            trigger: "#modalaccept #o_mpesa_pay_from_till",
            run: "click",
        },
        {
            content: "No phone is asked when the till pays",
            trigger: "#modalaccept div[name='o_mpesa_form']:has(div[name='o_mpesa_phone_block'].d-none)",
        },
        {
            content: "Pay",
            trigger: "#modalaccept button[name='o_payment_submit_button']:enabled",
            run: "click",
        },
        {
            content: "The status page tells that the till's operator confirms the payment",
            trigger:
                "div[name='o_payment_status'] div[name='o_payment_status_alert']" +
                ":contains(We sent an M-Pesa prompt to your till 600100)",
        },
        {
            content: "Back on the order: the payment is confirmed",
            trigger:
                "#quote_content div[name='o_payment_status_alert']" +
                ":contains(Your M-Pesa payment has been received)",
            timeout: 60000,
        },
        {
            content: "The quotation became a sales order",
            trigger: "#quote_content h2:contains(Sales Order)",
        },
        pageLoaded("The order's page is fully loaded"),
    ],
});
